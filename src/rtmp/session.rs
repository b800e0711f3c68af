//! Sans-IO RTMP publisher: bytes in, bytes out, events. The socket, TLS and
//! clock live in [`super::push`]; nothing here does I/O.
//!
//! Built on rml_rtmp: [`Handshake`] for the handshake and [`ClientSession`]
//! for `connect` (with `tcUrl`), `createStream`, `publish` (live), chunking,
//! acknowledgements and pings. What `ClientSession` cannot do goes through
//! rml_rtmp's message and chunk APIs on a second [`ChunkSerializer`]:
//!
//! - `releaseStream` / `FCPublish` before `createStream` (what OBS and ffmpeg
//!   send; some CDNs expect them);
//! - our own `@setDataFrame onMetaData` bytes (from `flv::on_metadata`) as a
//!   raw AMF0 data message, instead of `publish_metadata`'s fixed key set;
//! - the clean end: `FCUnpublish` + `deleteStream` (`stop_publishing` sends
//!   only `deleteStream`).
//!
//! Two serializers on one connection are safe because the peer decodes chunk
//! headers per chunk stream and rml_rtmp picks the chunk stream from the
//! message type: data messages (type 18, chunk stream 3) only ever come from
//! ours, and our commands (type 20, chunk stream 6) always use full (type 0)
//! headers. The one session command that follows ours on chunk stream 6,
//! `createStream`, has a type 1 header (it differs in length from
//! `connect`), which carries its own length and type and inherits only the
//! message stream id, 0 for both.
//!
//! `ClientSession` does not tell which stream id the server gave us, which
//! our own messages need; we read it from the `publish` command the session
//! sends, by decoding our outbound bytes with a [`ChunkDeserializer`] until
//! then.

use std::collections::VecDeque;

use bytes::Bytes;
use rml_rtmp::chunk_io::{ChunkDeserializer, ChunkSerializer, Packet};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::messages::{MessagePayload, RtmpMessage};
use rml_rtmp::rml_amf0::Amf0Value;
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;

/// Outbound chunk size set right after `connect`.
const CHUNK_SIZE: u32 = 4096;
/// AMF0 data message (`onMetaData`).
const TYPE_AMF0_DATA: u8 = 18;
/// Transaction ids of our own commands, far from the ones `ClientSession`
/// counts up from 1, so that answers to them are never taken for its own.
const TID_RELEASE_STREAM: f64 = 1001.0;
const TID_FC_PUBLISH: f64 = 1002.0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("RTMP handshake failed: {0}")]
    Handshake(String),
    #[error("RTMP protocol error: {0}")]
    Protocol(String),
    #[error("RTMP server refused: {0}")]
    Rejected(String),
    #[error("not publishing yet")]
    NotPublishing,
}

/// What the server told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The handshake is done and `connect` was sent.
    HandshakeDone,
    /// `connect` accepted.
    Connected,
    /// `publish` accepted (`NetStream.Publish.Start`): media may flow.
    Publishing { stream_id: u32 },
    /// Any other `onStatus` code that is not an error.
    Status(String),
}

enum Phase {
    Handshake(Box<Handshake>),
    Session(Box<ClientSession>),
}

/// One RTMP publishing connection, without the connection.
pub struct PublishSession {
    app: String,
    key: String,
    tc_url: String,
    phase: Phase,
    /// Serializer for the messages `ClientSession` cannot send.
    own: ChunkSerializer,
    /// Decodes our outbound bytes until the stream id is known.
    shadow: Option<ChunkDeserializer>,
    stream_id: Option<u32>,
    publishing: bool,
    finished: bool,
    out: Vec<u8>,
    events: VecDeque<SessionEvent>,
}

impl PublishSession {
    /// Starts a session; the handshake's first bytes are ready in
    /// [`PublishSession::take_output`].
    pub fn new(app: &str, key: &str, tc_url: &str) -> Result<Self, SessionError> {
        let mut handshake = Handshake::new(PeerType::Client);
        let p0p1 = handshake
            .generate_outbound_p0_and_p1()
            .map_err(|e| SessionError::Handshake(e.to_string()))?;
        let mut own = ChunkSerializer::new();
        // The session announces this size right after connect; our messages
        // all go out after that.
        own.set_max_chunk_size(CHUNK_SIZE, RtmpTimestamp::new(0))
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        Ok(Self {
            app: app.to_owned(),
            key: key.to_owned(),
            tc_url: tc_url.to_owned(),
            phase: Phase::Handshake(Box::new(handshake)),
            own,
            shadow: Some(ChunkDeserializer::new()),
            stream_id: None,
            publishing: false,
            finished: false,
            out: p0p1,
            events: VecDeque::new(),
        })
    }

    /// Bytes to write to the server, in order; empty when there are none.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// True once the server accepted `publish` (and until [`Self::finish`]).
    pub fn is_publishing(&self) -> bool {
        self.publishing && !self.finished
    }

    /// Feeds bytes read from the server.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let rest = match &mut self.phase {
            Phase::Session(_) => bytes.to_vec(),
            Phase::Handshake(h) => match h
                .process_bytes(bytes)
                .map_err(|e| SessionError::Handshake(e.to_string()))?
            {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    self.out.extend_from_slice(&response_bytes);
                    return Ok(());
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    self.out.extend_from_slice(&response_bytes);
                    self.start_session()?;
                    remaining_bytes
                }
            },
        };
        if rest.is_empty() {
            return Ok(());
        }
        let Phase::Session(session) = &mut self.phase else {
            return Ok(());
        };
        let results = session.handle_input(&rest).map_err(protocol)?;
        self.apply(results)
    }

    /// Sends an `@setDataFrame onMetaData` body (AMF0, from
    /// `flv::on_metadata(.., true)`) as a data message on our stream.
    pub fn send_metadata(&mut self, amf0: Bytes, timestamp_ms: u32) -> Result<(), SessionError> {
        let stream_id = self.publishing_stream()?;
        let payload = MessagePayload {
            timestamp: RtmpTimestamp::new(timestamp_ms),
            type_id: TYPE_AMF0_DATA,
            message_stream_id: stream_id,
            data: amf0,
        };
        let packet = self
            .own
            .serialize(&payload, true, false)
            .map_err(protocol)?;
        self.push_packet(packet)
    }

    /// Sends a VIDEODATA body (an FLV video tag body).
    pub fn send_video(&mut self, body: Bytes, timestamp_ms: u32) -> Result<(), SessionError> {
        self.publishing_stream()?;
        let Phase::Session(session) = &mut self.phase else {
            return Err(SessionError::NotPublishing);
        };
        let result = session
            .publish_video_data(body, RtmpTimestamp::new(timestamp_ms), false)
            .map_err(protocol)?;
        self.apply(vec![result])
    }

    /// Sends an AUDIODATA body (an FLV audio tag body).
    pub fn send_audio(&mut self, body: Bytes, timestamp_ms: u32) -> Result<(), SessionError> {
        self.publishing_stream()?;
        let Phase::Session(session) = &mut self.phase else {
            return Err(SessionError::NotPublishing);
        };
        let result = session
            .publish_audio_data(body, RtmpTimestamp::new(timestamp_ms), false)
            .map_err(protocol)?;
        self.apply(vec![result])
    }

    /// Ends the publication cleanly: `FCUnpublish` then `deleteStream`.
    /// Nothing when no stream was created; idempotent.
    pub fn finish(&mut self) -> Result<(), SessionError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let Some(stream_id) = self.stream_id else {
            return Ok(());
        };
        let fc_unpublish = command(
            "FCUnpublish",
            0.0,
            vec![Amf0Value::Utf8String(self.key.clone())],
        );
        let delete_stream = command(
            "deleteStream",
            0.0,
            vec![Amf0Value::Number(f64::from(stream_id))],
        );
        for message in [fc_unpublish, delete_stream] {
            self.send_own(message, 0)?;
        }
        Ok(())
    }

    fn publishing_stream(&self) -> Result<u32, SessionError> {
        match self.stream_id {
            Some(id) if self.is_publishing() => Ok(id),
            _ => Err(SessionError::NotPublishing),
        }
    }

    fn start_session(&mut self) -> Result<(), SessionError> {
        let mut config = ClientSessionConfig::new();
        config.tc_url = Some(self.tc_url.clone());
        config.chunk_size = CHUNK_SIZE;
        config.flash_version = "FMLE/3.0 (compatible; whipgate)".to_owned();
        let (mut session, results) = ClientSession::new(config).map_err(protocol)?;
        let connect = session
            .request_connection(self.app.clone())
            .map_err(protocol)?;
        self.phase = Phase::Session(Box::new(session));
        self.events.push_back(SessionEvent::HandshakeDone);
        self.apply(results)?;
        self.apply(vec![connect])
    }

    /// Queues the session's output and reacts to its events, in order.
    fn apply(&mut self, results: Vec<ClientSessionResult>) -> Result<(), SessionError> {
        let mut events = Vec::new();
        for r in results {
            match r {
                ClientSessionResult::OutboundResponse(packet) => self.push_packet(packet)?,
                ClientSessionResult::RaisedEvent(e) => events.push(e),
                ClientSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        // Events after the packets of the same batch: the chunk size change
        // that comes with "connect accepted" must go out before our commands.
        for e in events {
            self.on_event(e)?;
        }
        Ok(())
    }

    fn on_event(&mut self, event: ClientSessionEvent) -> Result<(), SessionError> {
        match event {
            ClientSessionEvent::ConnectionRequestAccepted => {
                self.events.push_back(SessionEvent::Connected);
                let key = Amf0Value::Utf8String(self.key.clone());
                self.send_own(
                    command("releaseStream", TID_RELEASE_STREAM, vec![key.clone()]),
                    0,
                )?;
                self.send_own(command("FCPublish", TID_FC_PUBLISH, vec![key]), 0)?;
                let Phase::Session(session) = &mut self.phase else {
                    return Ok(());
                };
                let request = session
                    .request_publishing(self.key.clone(), PublishRequestType::Live)
                    .map_err(protocol)?;
                self.apply(vec![request])
            }
            ClientSessionEvent::ConnectionRequestRejected { description } => Err(
                SessionError::Rejected(format!("connect rejected: {description}")),
            ),
            ClientSessionEvent::PublishRequestAccepted => {
                let Some(stream_id) = self.stream_id else {
                    return Err(SessionError::Protocol(
                        "publish accepted before a stream was created".to_owned(),
                    ));
                };
                self.publishing = true;
                self.events
                    .push_back(SessionEvent::Publishing { stream_id });
                Ok(())
            }
            ClientSessionEvent::UnhandleableOnStatusCode { code } => {
                if is_error_status(&code) {
                    // The code is a fixed identifier; it does not echo the key.
                    Err(SessionError::Rejected(code))
                } else {
                    self.events.push_back(SessionEvent::Status(code));
                    Ok(())
                }
            }
            // Answers to releaseStream/FCPublish, onBWDone, acks, pings.
            _ => Ok(()),
        }
    }

    fn send_own(&mut self, message: RtmpMessage, stream_id: u32) -> Result<(), SessionError> {
        let payload = message
            .into_message_payload(RtmpTimestamp::new(0), stream_id)
            .map_err(protocol)?;
        let packet = self
            .own
            .serialize(&payload, true, false)
            .map_err(protocol)?;
        self.push_packet(packet)
    }

    fn push_packet(&mut self, packet: Packet) -> Result<(), SessionError> {
        if let Some(shadow) = self.shadow.as_mut() {
            let mut input: &[u8] = &packet.bytes;
            while let Some(payload) = shadow.get_next_message(input).map_err(protocol)? {
                input = &[];
                match payload.to_rtmp_message().map_err(protocol)? {
                    RtmpMessage::SetChunkSize { size } => {
                        shadow.set_max_chunk_size(size as usize).map_err(protocol)?
                    }
                    RtmpMessage::Amf0Command { command_name, .. } if command_name == "publish" => {
                        self.stream_id = Some(payload.message_stream_id);
                    }
                    _ => {}
                }
            }
            if self.stream_id.is_some() {
                self.shadow = None;
            }
        }
        self.out.extend_from_slice(&packet.bytes);
        Ok(())
    }
}

fn command(name: &str, transaction_id: f64, args: Vec<Amf0Value>) -> RtmpMessage {
    RtmpMessage::Amf0Command {
        command_name: name.to_owned(),
        transaction_id,
        command_object: Amf0Value::Null,
        additional_arguments: args,
    }
}

/// `onStatus` codes that end a publication attempt.
fn is_error_status(code: &str) -> bool {
    [
        ".Failed",
        ".Rejected",
        ".BadName",
        ".Error",
        ".Closed",
        "Denied",
    ]
    .iter()
    .any(|s| code.contains(s))
}

fn protocol(e: impl std::fmt::Display) -> SessionError {
    SessionError::Protocol(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_rtmp::sessions::{
        ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
    };

    /// An rml_rtmp server on the other end of the wire, in memory.
    struct Server {
        handshake: Option<Handshake>,
        session: Option<ServerSession>,
        out: Vec<u8>,
        events: Vec<ServerSessionEvent>,
    }

    impl Server {
        fn new() -> Self {
            Self {
                handshake: Some(Handshake::new(PeerType::Server)),
                session: None,
                out: Vec::new(),
                events: Vec::new(),
            }
        }

        fn input(&mut self, bytes: &[u8]) {
            let mut rest = bytes.to_vec();
            if let Some(h) = self.handshake.as_mut() {
                match h.process_bytes(&rest).unwrap() {
                    HandshakeProcessResult::InProgress { response_bytes } => {
                        self.out.extend(response_bytes);
                        return;
                    }
                    HandshakeProcessResult::Completed {
                        response_bytes,
                        remaining_bytes,
                    } => {
                        self.out.extend(response_bytes);
                        self.handshake = None;
                        let (s, results) = ServerSession::new(ServerSessionConfig::new()).unwrap();
                        self.session = Some(s);
                        self.apply(results);
                        rest = remaining_bytes;
                    }
                }
            }
            if rest.is_empty() {
                return;
            }
            let results = self.session.as_mut().unwrap().handle_input(&rest).unwrap();
            self.apply(results);
        }

        fn apply(&mut self, results: Vec<ServerSessionResult>) {
            for r in results {
                match r {
                    ServerSessionResult::OutboundResponse(p) => self.out.extend(p.bytes),
                    ServerSessionResult::RaisedEvent(e) => {
                        let accept = match &e {
                            ServerSessionEvent::ConnectionRequested { request_id, .. }
                            | ServerSessionEvent::PublishStreamRequested { request_id, .. } => {
                                Some(*request_id)
                            }
                            _ => None,
                        };
                        self.events.push(e);
                        if let Some(id) = accept {
                            let more = self.session.as_mut().unwrap().accept_request(id).unwrap();
                            self.apply(more);
                        }
                    }
                    ServerSessionResult::UnhandleableMessageReceived(_) => {}
                }
            }
        }
    }

    /// Moves bytes both ways until nothing is left to move.
    fn pump(client: &mut PublishSession, server: &mut Server) {
        for _ in 0..50 {
            let c = client.take_output();
            let s = std::mem::take(&mut server.out);
            if c.is_empty() && s.is_empty() {
                return;
            }
            if !c.is_empty() {
                server.input(&c);
            }
            if !s.is_empty() {
                client.handle_input(&s).unwrap();
            }
        }
        panic!("no quiescence");
    }

    #[test]
    fn publishes_metadata_media_and_ends_cleanly() {
        let mut client = PublishSession::new("live", "secret?x=1", "rtmp://h/live").unwrap();
        let mut server = Server::new();
        assert!(client.send_video(Bytes::from_static(b"v"), 0).is_err());
        pump(&mut client, &mut server);
        let events: Vec<_> = std::iter::from_fn(|| client.poll_event()).collect();
        assert_eq!(
            events,
            vec![
                SessionEvent::HandshakeDone,
                SessionEvent::Connected,
                SessionEvent::Publishing { stream_id: 1 }
            ]
        );
        assert!(client.is_publishing());
        assert!(server.events.iter().any(|e| matches!(e,
            ServerSessionEvent::ConnectionRequested { app_name, .. } if app_name == "live")));
        // rml_rtmp's server does not handle these two; they arrive intact.
        for name in ["releaseStream", "FCPublish"] {
            assert!(server.events.iter().any(|e| matches!(e,
                ServerSessionEvent::UnhandleableAmf0Command { command_name, additional_values, .. }
                    if command_name == name
                        && additional_values == &[Amf0Value::Utf8String("secret?x=1".into())])));
        }
        assert!(server.events.iter().any(|e| matches!(e,
            ServerSessionEvent::PublishStreamRequested { stream_key, .. } if stream_key == "secret?x=1")));

        let meta = crate::rtmp::flv::on_metadata(
            &crate::rtmp::flv::Metadata {
                width: Some(640),
                height: Some(360),
                has_video: true,
                ..Default::default()
            },
            true,
        );
        client.send_metadata(meta, 0).unwrap();
        // A large video message spans several chunks.
        let big = Bytes::from(vec![0x17; 10_000]);
        client.send_video(big.clone(), 0).unwrap();
        client
            .send_audio(Bytes::from_static(b"\xaf\x01a"), 21)
            .unwrap();
        client
            .send_video(Bytes::from_static(b"\x27\x01v"), 33)
            .unwrap();
        client.finish().unwrap();
        assert!(!client.is_publishing());
        assert!(client.send_video(Bytes::from_static(b"v"), 66).is_err());
        pump(&mut client, &mut server);

        let mut video = Vec::new();
        let mut audio = Vec::new();
        let mut metadata = None;
        let mut fc_unpublish = false;
        let mut finished = false;
        for e in &server.events {
            match e {
                ServerSessionEvent::VideoDataReceived {
                    data, timestamp, ..
                } => video.push((timestamp.value, data.clone())),
                ServerSessionEvent::AudioDataReceived {
                    data, timestamp, ..
                } => audio.push((timestamp.value, data.clone())),
                ServerSessionEvent::StreamMetadataChanged { metadata: m, .. } => {
                    metadata = Some(m.clone())
                }
                ServerSessionEvent::UnhandleableAmf0Command { command_name, .. } => {
                    fc_unpublish |= command_name == "FCUnpublish";
                }
                ServerSessionEvent::PublishStreamFinished { stream_key, .. } => {
                    assert!(fc_unpublish, "FCUnpublish comes before deleteStream");
                    assert_eq!(stream_key, "secret?x=1");
                    finished = true;
                }
                _ => {}
            }
        }
        let m = metadata.expect("metadata received");
        assert_eq!((m.video_width, m.video_height), (Some(640), Some(360)));
        assert_eq!(video.len(), 2);
        assert_eq!(video[0], (0, big));
        assert_eq!(video[1].0, 33);
        assert_eq!(audio, vec![(21, Bytes::from_static(b"\xaf\x01a"))]);
        assert!(finished, "deleteStream received");
    }

    #[test]
    fn garbage_from_the_server_is_an_error_not_a_panic() {
        let mut client = PublishSession::new("live", "k", "rtmp://h/live").unwrap();
        // A wrong RTMP version byte, then a full-size handshake of noise.
        let mut noise = vec![0xff_u8; 1 + 1536 * 2];
        noise[0] = 3;
        for (i, b) in noise.iter_mut().enumerate().skip(1) {
            *b = (i * 7919 % 251) as u8;
        }
        let _ = client.handle_input(&noise);
        let _ = client.handle_input(&[0xc3; 64]);
        let mut client = PublishSession::new("live", "k", "rtmp://h/live").unwrap();
        assert!(client.handle_input(&[9; 3073]).is_err());
    }

    #[test]
    fn error_status_codes() {
        assert!(is_error_status("NetStream.Publish.BadName"));
        assert!(is_error_status("NetStream.Publish.Rejected"));
        assert!(is_error_status("NetConnection.Connect.Closed"));
        assert!(!is_error_status("NetStream.Unpublish.Success"));
        assert!(!is_error_status("NetStream.Publish.Start"));
    }
}
