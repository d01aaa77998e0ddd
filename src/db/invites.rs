//! Third-party invites in Sydent's tables (`invite_tokens`, `ephemeral_public_keys`), so that
//! invites a Sydent node stored before the switch are delivered too, and the persistent onbind
//! queue (`onbind_deliveries`, `onbind_delivery_invites`). Written by the association store
//! (the database's single writer); read by the invite actor.

use diesel::prelude::*;
use diesel::SqliteConnection;

use super::schema::{
    ephemeral_public_keys, invite_tokens, onbind_deliveries, onbind_delivery_invites,
};
use crate::invite::{InviteWrite, PendingInvite};

/// A queued onbind delivery, as the invite actor loads it at start.
#[derive(Debug, Clone, Queryable)]
pub struct DeliveryRow {
    pub id: i64,
    pub destination: String,
    pub mxid: String,
    pub body: String,
    pub created_ts: i64,
}

/// What [`claim_delivery`] queues.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    pub destination: &'a str,
    pub mxid: &'a str,
    pub body: &'a str,
    pub created_ts: i64,
    pub invite_ids: &'a [i64],
}

pub fn apply(conn: &mut SqliteConnection, write: &InviteWrite) -> QueryResult<()> {
    match write {
        InviteWrite::Store(invite) => {
            diesel::insert_into(invite_tokens::table)
                .values((
                    invite_tokens::medium.eq(&invite.medium),
                    invite_tokens::address.eq(&invite.address),
                    invite_tokens::room_id.eq(&invite.room_id),
                    invite_tokens::sender.eq(&invite.sender),
                    invite_tokens::token.eq(&invite.token),
                    invite_tokens::received_ts.eq(invite.received_ts),
                ))
                .execute(conn)?;
            diesel::insert_into(ephemeral_public_keys::table)
                .values((
                    ephemeral_public_keys::public_key.eq(&invite.public_key),
                    ephemeral_public_keys::verify_count.eq(0),
                    ephemeral_public_keys::persistence_ts.eq(invite.received_ts),
                ))
                .execute(conn)?;
        }
        InviteWrite::Withdraw { token } => {
            diesel::delete(invite_tokens::table.filter(invite_tokens::token.eq(token)))
                .execute(conn)?;
        }
        InviteWrite::Delivered {
            delivery_id,
            delete_tokens,
            now_s,
        } => {
            let carried = onbind_delivery_invites::table
                .filter(onbind_delivery_invites::delivery_id.eq(delivery_id))
                .select(onbind_delivery_invites::invite_id);
            let invites = invite_tokens::table.filter(invite_tokens::id.eq_any(carried));
            if *delete_tokens {
                diesel::delete(invites).execute(conn)?;
            } else {
                diesel::update(invites)
                    .set(invite_tokens::sent_ts.eq(now_s))
                    .execute(conn)?;
            }
            release(conn, *delivery_id)?;
            diesel::delete(onbind_deliveries::table.find(delivery_id)).execute(conn)?;
        }
        InviteWrite::GaveUp {
            delivery_id,
            reason,
            now_ms,
        } => {
            release(conn, *delivery_id)?;
            diesel::update(onbind_deliveries::table.find(delivery_id))
                .set((
                    onbind_deliveries::gave_up_ts.eq(now_ms),
                    onbind_deliveries::last_error.eq(reason),
                ))
                .execute(conn)?;
        }
    }
    Ok(())
}

fn release(conn: &mut SqliteConnection, delivery_id: i64) -> QueryResult<usize> {
    diesel::delete(
        onbind_delivery_invites::table.filter(onbind_delivery_invites::delivery_id.eq(delivery_id)),
    )
    .execute(conn)
}

/// The invites waiting for `(medium, address)`: not delivered yet, and not carried by a queued
/// delivery. Oldest first.
pub fn pending_for(
    conn: &mut SqliteConnection,
    medium: &str,
    address: &str,
) -> QueryResult<Vec<PendingInvite>> {
    let claimed = onbind_delivery_invites::table.select(onbind_delivery_invites::invite_id);
    invite_tokens::table
        .filter(invite_tokens::medium.eq(medium))
        .filter(invite_tokens::address.eq(address))
        .filter(invite_tokens::sent_ts.is_null())
        .filter(diesel::dsl::not(invite_tokens::id.eq_any(claimed)))
        .order(invite_tokens::id)
        .select((
            invite_tokens::id,
            invite_tokens::medium,
            invite_tokens::address,
            invite_tokens::room_id,
            invite_tokens::sender,
            invite_tokens::token,
        ))
        .load(conn)
}

/// Queues a delivery carrying `invite_ids` (in the caller's transaction: with the bind that
/// causes it). Answers its id.
pub fn claim_delivery(conn: &mut SqliteConnection, new: &NewDelivery<'_>) -> QueryResult<i64> {
    let id: i64 = diesel::insert_into(onbind_deliveries::table)
        .values((
            onbind_deliveries::destination.eq(new.destination),
            onbind_deliveries::mxid.eq(new.mxid),
            onbind_deliveries::body.eq(new.body),
            onbind_deliveries::created_ts.eq(new.created_ts),
        ))
        .returning(onbind_deliveries::id)
        .get_result(conn)?;
    let claims: Vec<_> = new
        .invite_ids
        .iter()
        .map(|invite| {
            (
                onbind_delivery_invites::invite_id.eq(invite),
                onbind_delivery_invites::delivery_id.eq(id),
            )
        })
        .collect();
    diesel::insert_into(onbind_delivery_invites::table)
        .values(claims)
        .execute(conn)?;
    Ok(id)
}

/// The deliveries still to make, oldest first.
pub fn queued_deliveries(conn: &mut SqliteConnection) -> QueryResult<Vec<DeliveryRow>> {
    onbind_deliveries::table
        .filter(onbind_deliveries::gave_up_ts.is_null())
        .order(onbind_deliveries::id)
        .select((
            onbind_deliveries::id,
            onbind_deliveries::destination,
            onbind_deliveries::mxid,
            onbind_deliveries::body,
            onbind_deliveries::created_ts,
        ))
        .load(conn)
}

/// How many deliveries the node gave up on.
pub fn count_given_up(conn: &mut SqliteConnection) -> QueryResult<i64> {
    onbind_deliveries::table
        .filter(onbind_deliveries::gave_up_ts.is_not_null())
        .count()
        .get_result(conn)
}

/// The sender of the invite with this token (`sign-ed25519`), if it is still stored.
pub fn sender_of(conn: &mut SqliteConnection, token: &str) -> QueryResult<Option<String>> {
    invite_tokens::table
        .filter(invite_tokens::token.eq(token))
        .select(invite_tokens::sender)
        .first(conn)
        .optional()
}

/// What the node needs from the invite tables when it starts.
#[derive(Debug, Default)]
pub struct InviteState {
    /// (medium, address) of every invite waiting for its address to be bound.
    pub pending: Vec<(String, String)>,
    /// The deliveries still to make, oldest first.
    pub queued: Vec<DeliveryRow>,
    /// Deliveries given up on.
    pub given_up: i64,
}

pub fn load_state(conn: &mut SqliteConnection) -> QueryResult<InviteState> {
    let claimed = onbind_delivery_invites::table.select(onbind_delivery_invites::invite_id);
    let pending = invite_tokens::table
        .filter(invite_tokens::sent_ts.is_null())
        .filter(diesel::dsl::not(invite_tokens::id.eq_any(claimed)))
        .select((invite_tokens::medium, invite_tokens::address))
        .distinct()
        .load(conn)?;
    Ok(InviteState {
        pending,
        queued: queued_deliveries(conn)?,
        given_up: count_given_up(conn)?,
    })
}
