//! Just enough HTTP/1.1 for a local control API: one request per
//! connection, bounded headers and body, JSON responses. Anything else is
//! refused with a 4xx and a JSON error.
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const MAX_HEAD: usize = 8 * 1024;
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client has to send its whole request, and to take the answer.
const REQUEST_TIME: Duration = Duration::from_secs(2);

pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        Response { status, body: serde_json::to_string(value).unwrap_or_else(|_| "{}".into()) }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        _ => "Error",
    }
}

/// Reads one request; Err is the response to send instead.
pub fn read_request(stream: &mut impl Read) -> Result<Request, Response> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err(Response::error(400, "connection closed before the request ended")),
            Err(_) => return Err(Response::error(408, "request not received in time")),
        }
        if head.len() > MAX_HEAD {
            return Err(Response::error(413, format!("request head over {MAX_HEAD} bytes")));
        }
    }
    let head = std::str::from_utf8(&head).map_err(|_| Response::error(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path, version) = (first.next(), first.next(), first.next());
    let (Some(method), Some(path), Some(version)) = (method, path, version) else {
        return Err(Response::error(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return Err(Response::error(400, "malformed request line"));
    }
    let mut length = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| Response::error(400, "malformed header"))?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().map_err(|_| Response::error(400, "bad Content-Length"))?;
        }
    }
    if length > MAX_BODY {
        return Err(Response::error(413, format!("body over {MAX_BODY} bytes")));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).map_err(|_| Response::error(400, "body shorter than its Content-Length"))?;
    Ok(Request { method: method.to_string(), path: path.to_string(), body })
}

pub fn write_response(stream: &mut impl Write, response: &Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(response.body.as_bytes())
}

/// A connection that must deliver its whole request within [`REQUEST_TIME`]
/// of being accepted: a per-read timeout alone would let a client that
/// trickles one byte at a time hold the API's one thread for hours.
pub struct Connection {
    stream: std::os::unix::net::UnixStream,
    until: Instant,
}

impl Connection {
    pub fn new(stream: std::os::unix::net::UnixStream) -> Self {
        let _ = stream.set_write_timeout(Some(REQUEST_TIME));
        Connection { stream, until: Instant::now() + REQUEST_TIME }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, u16> {
        read_request(&mut &raw[..]).map_err(|r| r.status)
    }

    #[test]
    fn parses_and_refuses() {
        let ok = parse(b"PUT /vm/shutdown HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").ok().unwrap();
        assert_eq!((ok.method.as_str(), ok.path.as_str(), ok.body.as_slice()), ("PUT", "/vm/shutdown", &b"{}"[..]));
        assert_eq!(parse(b"garbage\r\n\r\n").err(), Some(400));
        assert_eq!(parse(b"GET /vm HTTP/1.1\r\nContent-Length: 999999\r\n\r\n").err(), Some(413));
        assert_eq!(parse(b"GET /vm HTTP/1.1\r\nContent-Length: nope\r\n\r\n").err(), Some(400));
        assert_eq!(parse(b"GET /vm HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort").err(), Some(400));
        assert_eq!(parse(&[b'a'; 9000]).err(), Some(413));
    }

    #[test]
    fn a_client_that_trickles_is_cut_off_at_the_request_deadline() {
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let trickle = std::thread::spawn(move || {
            let mut client = client;
            // One byte every 100 ms: each read is quick, the request never ends.
            for _ in 0..100 {
                if client.write_all(b"G").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Without the deadline the client would finish its 100 bytes and
        // hang up, which reads as a 400 after 10 s instead.
        let refusal = read_request(&mut Connection::new(server)).err().map(|r| r.status);
        assert_eq!(refusal, Some(408));
        trickle.join().unwrap();
    }
}
