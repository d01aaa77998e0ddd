//! An SMS gateway stand-in: OpenMarket's v4 `mt` endpoint is a paid external API, so the tests
//! run a tiny HTTP/1.1 server of their own on a loopback port the OS picks. It records every
//! connection and every request (method, path, headers, body) and answers what the test asks
//! (by default OpenMarket's success: 202 with a `Location` ticket and an `X-Request-Id`).
//! One request per connection (`Connection: close`); it serves another process (a test node)
//! as well as a client in the test itself. It stops when the last [`SmsRecorder`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// The path the stand-in's URL ends with (OpenMarket's).
pub const MT_PATH: &str = "/sms/v4/mt";
/// The ticket and request id of the default answer.
pub const TICKET: &str = "d3a1b2c3-ticket";
pub const REQUEST_ID: &str = "req-0001";

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// In arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The value of header `name` (case-insensitive); panics if it came more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let value = values.next();
        assert!(values.next().is_none(), "{name} sent twice");
        value
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the request body is JSON")
    }
}

/// What the stand-in answers.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

#[derive(Debug)]
struct State {
    connections: usize,
    requests: Vec<RecordedRequest>,
    reply: Reply,
}

/// The test's side of the stand-in: what it received, what it answers next.
#[derive(Clone)]
pub struct SmsRecorder {
    state: Arc<Mutex<State>>,
    count: tokio::sync::watch::Receiver<usize>,
    _stop: Arc<Stop>,
}

pub struct FakeSmsGateway;

impl FakeSmsGateway {
    /// Starts a stand-in: (its `api_url`, `http://127.0.0.1:<port>/sms/v4/mt`; its recorder).
    pub fn start() -> (String, SmsRecorder) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            connections: 0,
            requests: Vec::new(),
            reply: Reply {
                status: 202,
                headers: vec![
                    (
                        "Location".into(),
                        format!("https://smsc.openmarket.com{MT_PATH}/{TICKET}"),
                    ),
                    ("X-Request-Id".into(), REQUEST_ID.into()),
                ],
                body: String::new(),
            },
        }));
        let (count_tx, count_rx) = tokio::sync::watch::channel(0);
        let stop = Arc::new(Stop {
            stopped: Arc::new(AtomicBool::new(false)),
            port,
        });
        let stopped = Arc::clone(&stop.stopped);
        let server_state = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                server_state.lock().unwrap().connections += 1;
                // A request cut short is not recorded (and not answered).
                let mut reader = BufReader::new(stream);
                let Some(request) = read_request(&mut reader) else {
                    continue;
                };
                // Recorded before the answer, so a client that has its answer sees it here.
                let reply = {
                    let mut state = server_state.lock().unwrap();
                    state.requests.push(request);
                    count_tx.send_replace(state.requests.len());
                    state.reply.clone()
                };
                let _ = write_reply(reader.into_inner(), &reply);
            }
        });
        (
            format!("http://127.0.0.1:{port}{MT_PATH}"),
            SmsRecorder {
                state,
                count: count_rx,
                _stop: stop,
            },
        )
    }
}

impl SmsRecorder {
    /// Every request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// TCP connections accepted so far (a refused destination must leave this at 0).
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Answer every later request with this status, these headers and this (JSON) body.
    pub fn reply(&self, status: u16, headers: &[(&str, &str)], body: &str) {
        self.state.lock().unwrap().reply = Reply {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        };
    }

    /// Waits until `count` requests have arrived (a node sends on its own schedule), at most
    /// `limit`; returns them.
    pub async fn wait_for_requests(&self, count: usize, limit: Duration) -> Vec<RecordedRequest> {
        let mut rx = self.count.clone();
        let arrived = tokio::time::timeout(limit, rx.wait_for(|n| *n >= count)).await;
        assert!(
            matches!(arrived, Ok(Ok(_))),
            "{count} SMS requests expected within {limit:?}, got {}",
            self.requests().len()
        );
        self.requests()
    }
}

/// Stops the server when the last recorder goes: sets the flag, then wakes `accept`.
struct Stop {
    stopped: Arc<AtomicBool>,
    port: u16,
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one request (head and `Content-Length` body).
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<RecordedRequest> {
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(RecordedRequest {
        method,
        path,
        headers,
        body,
    })
}

fn write_reply(mut stream: TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reason(reply.status),
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        answer.push_str(&format!("{name}: {value}\r\n"));
    }
    answer.push_str("\r\n");
    answer.push_str(&reply.body);
    stream.write_all(answer.as_bytes())?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
