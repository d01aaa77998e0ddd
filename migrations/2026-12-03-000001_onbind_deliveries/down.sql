DROP INDEX IF EXISTS onbind_delivery_invites_delivery;
DROP TABLE IF EXISTS onbind_delivery_invites;
DROP TABLE IF EXISTS onbind_deliveries;
