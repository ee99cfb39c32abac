//! The server's codec: bincode, as tarpc's own, plus one check that must
//! happen before tarpc decodes a request. The deadline a client sends is a
//! `Duration` that tarpc adds to `Instant::now()` and hands to a timer
//! wheel; a huge one panics in either. The codec rewrites any deadline
//! beyond [`MAX_DEADLINE`] to it, so a hostile client gets a bounded wait
//! instead of a crashed server.
use super::MAX_DEADLINE;
use bincode::Options;
use bytes::{Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;
use tarpc::tokio_serde::{Deserializer, Serializer};

/// The options tarpc's bincode transport uses (varint integers).
fn options() -> bincode::DefaultOptions {
    bincode::DefaultOptions::new()
}

fn invalid(e: bincode::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Bincode for frames that carry `tarpc::ClientMessage`s in and responses out.
pub struct ServerCodec<Item, SinkItem>(PhantomData<fn() -> (Item, SinkItem)>);

impl<Item, SinkItem> Default for ServerCodec<Item, SinkItem> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Item: DeserializeOwned, SinkItem> Deserializer<Item> for ServerCodec<Item, SinkItem> {
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, io::Error> {
        match cap_deadline(src) {
            Some(capped) => options().deserialize(&capped).map_err(invalid),
            None => options().deserialize(src).map_err(invalid),
        }
    }
}

impl<Item, SinkItem: Serialize> Serializer<SinkItem> for ServerCodec<Item, SinkItem> {
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, io::Error> {
        options().serialize(item).map(Bytes::from).map_err(invalid)
    }
}

/// `ClientMessage::Request`'s variant index; its payload starts with the
/// request context, whose first field is the deadline.
const REQUEST_VARIANT: u32 = 0;

/// The frame with its deadline cut to [`MAX_DEADLINE`], or None when it
/// needs no change (or is not a well-formed request: decoding will say so).
pub fn cap_deadline(frame: &[u8]) -> Option<Vec<u8>> {
    let mut rest = frame;
    let variant: u32 = options().deserialize_from(&mut rest).ok()?;
    if variant != REQUEST_VARIANT {
        return None;
    }
    let secs: u64 = options().deserialize_from(&mut rest).ok()?;
    let nanos: u32 = options().deserialize_from(&mut rest).ok()?;
    if Duration::from_secs(secs).checked_add(Duration::from_nanos(nanos.into()))? <= MAX_DEADLINE {
        return None;
    }
    let mut capped = options().serialize(&(REQUEST_VARIANT, MAX_DEADLINE.as_secs(), 0u32)).ok()?;
    capped.extend_from_slice(rest);
    Some(capped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMemoryRequest, Segment};
    use std::time::Instant;
    use tarpc::context::Context;

    fn request_frame(deadline_secs: u64) -> Vec<u8> {
        // What a client puts on the wire: the deadline is relative, so build
        // the frame by hand for deadlines no Instant can hold.
        let context = Context::current();
        let message = GuestMemoryRequest::Read { segments: vec![Segment { addr: 0x1000, len: 8 }] };
        let body = options().serialize(&(context.trace_context, 7u64, message)).unwrap();
        let mut frame = options().serialize(&(REQUEST_VARIANT, deadline_secs, 5u32)).unwrap();
        frame.extend_from_slice(&body);
        frame
    }

    fn decode(frame: &[u8]) -> tarpc::ClientMessage<GuestMemoryRequest> {
        let mut codec = ServerCodec::<tarpc::ClientMessage<GuestMemoryRequest>, ()>::default();
        Pin::new(&mut codec).deserialize(&BytesMut::from(frame)).unwrap()
    }

    #[test]
    fn a_deadline_years_away_is_cut_to_the_maximum() {
        for secs in [u64::MAX, 1 << 40, 3600] {
            let before = Instant::now();
            let tarpc::ClientMessage::Request(request) = decode(&request_frame(secs)) else { panic!("not a request") };
            assert!(request.context.deadline <= Instant::now() + MAX_DEADLINE, "{secs} s was not capped");
            assert!(request.context.deadline >= before + MAX_DEADLINE - Duration::from_secs(1));
            assert_eq!(request.id, 7);
            assert!(matches!(request.message, GuestMemoryRequest::Read { ref segments } if segments[0].addr == 0x1000));
        }
    }

    #[test]
    fn an_ordinary_deadline_and_other_messages_pass_unchanged() {
        let frame = request_frame(10);
        assert_eq!(cap_deadline(&frame), None);
        let tarpc::ClientMessage::Request(request) = decode(&frame) else { panic!("not a request") };
        assert!(request.context.deadline <= Instant::now() + Duration::from_secs(11));
        let cancel: tarpc::ClientMessage<GuestMemoryRequest> =
            tarpc::ClientMessage::Cancel { trace_context: Default::default(), request_id: u64::MAX };
        assert_eq!(cap_deadline(&options().serialize(&cancel).unwrap()), None);
        assert_eq!(cap_deadline(&[]), None);
    }
}
