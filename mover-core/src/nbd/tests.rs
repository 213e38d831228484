//! The client against a scripted peer on an in-memory pipe: handshake variants and reply
//! shapes that real servers do not produce on demand.

use std::io;
use std::time::Duration;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::client::{BlockSize, Client, Command, ExportInfo, NbdOptions, ServerError};
use super::handshake::handshake;
use super::pipeline::Conn;
use super::proto::{self, Descriptor};
use super::uri::NbdUri;
use crate::error::MoverError;

const SIZE: u64 = 1 << 20;

fn u16b(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

fn u32b(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn u64b(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// The server side of an option reply.
fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = u64b(proto::OPTION_REPLY_MAGIC).to_vec();
    out.extend_from_slice(&u32b(option));
    out.extend_from_slice(&u32b(reply));
    out.extend_from_slice(&u32b(data.len() as u32));
    out.extend_from_slice(data);
    out
}

/// Read one option from the client: its number and data.
async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut header = [0u8; 16];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!(header[..8], u64b(proto::IHAVEOPT));
    let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
    let mut data = vec![0u8; u32::from_be_bytes(header[12..].try_into().unwrap()) as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, data)
}

async fn greet(s: &mut DuplexStream, flags: u16) -> u32 {
    let mut greeting = u64b(proto::NBDMAGIC).to_vec();
    greeting.extend_from_slice(&u64b(proto::IHAVEOPT));
    greeting.extend_from_slice(&u16b(flags));
    s.write_all(&greeting).await.unwrap();
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags).await.unwrap();
    u32::from_be_bytes(client_flags)
}

fn export_info(size: u64, flags: u16) -> Vec<u8> {
    let mut info = u16b(proto::INFO_EXPORT).to_vec();
    info.extend_from_slice(&u64b(size));
    info.extend_from_slice(&u16b(flags));
    info
}

#[tokio::test]
async fn handshake_negotiates_everything_a_modern_server_offers() {
    let (mut ours, mut theirs) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        let flags = greet(
            &mut theirs,
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        )
        .await;
        assert_eq!(
            flags,
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES
        );
        let (option, _) = read_option(&mut theirs).await;
        assert_eq!(option, proto::OPT_STRUCTURED_REPLY);
        theirs
            .write_all(&option_reply(option, proto::REP_ACK, &[]))
            .await
            .unwrap();
        let (option, data) = read_option(&mut theirs).await;
        assert_eq!(option, proto::OPT_SET_META_CONTEXT);
        assert_eq!(
            data,
            proto::encode_set_meta_context("disk", &[proto::BASE_ALLOCATION])
        );
        let mut context = u32b(3).to_vec();
        context.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        theirs
            .write_all(&option_reply(option, proto::REP_META_CONTEXT, &context))
            .await
            .unwrap();
        theirs
            .write_all(&option_reply(option, proto::REP_ACK, &[]))
            .await
            .unwrap();
        let (option, data) = read_option(&mut theirs).await;
        assert_eq!(option, proto::OPT_GO);
        assert_eq!(data, proto::encode_go("disk", &[proto::INFO_BLOCK_SIZE]));
        let mut block = u16b(proto::INFO_BLOCK_SIZE).to_vec();
        for v in [512u32, 4096, 1 << 20] {
            block.extend_from_slice(&u32b(v));
        }
        let flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_CAN_MULTI_CONN;
        for reply in [
            option_reply(option, proto::REP_INFO, &block),
            option_reply(option, proto::REP_INFO, &[0, 1, b'x']),
            option_reply(option, proto::REP_INFO, &export_info(SIZE, flags)),
            option_reply(option, proto::REP_ACK, &[]),
        ] {
            theirs.write_all(&reply).await.unwrap();
        }
    });
    let info = handshake(&mut ours, "disk", "test").await.unwrap();
    server.await.unwrap();
    assert_eq!(
        info,
        ExportInfo {
            size: SIZE,
            flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_CAN_MULTI_CONN,
            structured_replies: true,
            base_allocation: Some(3),
            block_size: Some(BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 20
            }),
        }
    );
}

#[tokio::test]
async fn handshake_falls_back_to_export_name() {
    let (mut ours, mut theirs) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        // No NO_ZEROES: the export name reply carries its 124 reserved bytes.
        let flags = greet(&mut theirs, proto::FLAG_FIXED_NEWSTYLE).await;
        assert_eq!(flags, proto::FLAG_C_FIXED_NEWSTYLE);
        loop {
            let (option, data) = read_option(&mut theirs).await;
            if option == proto::OPT_EXPORT_NAME {
                assert_eq!(data, b"old");
                let mut reply = u64b(SIZE).to_vec();
                reply.extend_from_slice(&u16b(proto::TFLAG_HAS_FLAGS));
                reply.extend_from_slice(&[0u8; proto::EXPORT_NAME_ZEROES]);
                theirs.write_all(&reply).await.unwrap();
                return;
            }
            theirs
                .write_all(&option_reply(option, proto::REP_ERR_UNSUP, &[]))
                .await
                .unwrap();
        }
    });
    let info = handshake(&mut ours, "old", "test").await.unwrap();
    server.await.unwrap();
    assert_eq!(info.size, SIZE);
    assert!(!info.structured_replies);
    assert_eq!(info.base_allocation, None);
    assert_eq!(info.block_size, None);
}

#[tokio::test]
async fn handshake_names_a_missing_export() {
    let (mut ours, mut theirs) = duplex(1 << 16);
    tokio::spawn(async move {
        greet(&mut theirs, proto::FLAG_FIXED_NEWSTYLE).await;
        loop {
            let (option, _) = read_option(&mut theirs).await;
            let reply = if option == proto::OPT_GO {
                option_reply(option, proto::REP_ERR_UNKNOWN, b"no such thing")
            } else {
                option_reply(option, proto::REP_ERR_UNSUP, &[])
            };
            theirs.write_all(&reply).await.unwrap();
        }
    });
    let err = handshake(&mut ours, "gone", "test").await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, MoverError::Connect { source, .. }
            if source.kind() == io::ErrorKind::NotFound),
        "{text}"
    );
    assert!(
        text.contains("\"gone\"") && text.contains("no such thing"),
        "{text}"
    );
}

/// A client whose connection is an in-memory pipe, and the server end of the pipe.
fn piped_client(structured: bool, context: Option<u32>) -> (Client, DuplexStream) {
    let (ours, theirs) = duplex(1 << 20);
    let (r, w) = tokio::io::split(ours);
    let info = ExportInfo {
        size: SIZE,
        flags: proto::TFLAG_HAS_FLAGS,
        structured_replies: structured,
        base_allocation: context,
        block_size: None,
    };
    let conn = Conn::start(Box::new(r), Box::new(w), info, 0);
    let uri = NbdUri::parse("nbd+unix:///?socket=/nonexistent/nbd.sock").unwrap();
    let opts = NbdOptions {
        reconnect_timeout: Duration::ZERO,
        ..NbdOptions::default()
    };
    (Client::with_connection(uri, "test", opts, conn), theirs)
}

/// Read one request from the client: command, handle, offset, length (payload skipped).
async fn read_request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
    let mut b = [0u8; proto::REQUEST_HEADER_LEN];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(b[..4], u32b(proto::REQUEST_MAGIC));
    let command = u16::from_be_bytes(b[6..8].try_into().unwrap());
    let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
    let offset = u64::from_be_bytes(b[16..24].try_into().unwrap());
    let length = u32::from_be_bytes(b[24..28].try_into().unwrap());
    if command == proto::CMD_WRITE {
        let mut payload = vec![0u8; length as usize];
        s.read_exact(&mut payload).await.unwrap();
    }
    (command, handle, offset, length)
}

fn chunk(done: bool, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = u32b(proto::STRUCTURED_REPLY_MAGIC).to_vec();
    out.extend_from_slice(&u16b(if done { proto::REPLY_FLAG_DONE } else { 0 }));
    out.extend_from_slice(&u16b(kind));
    out.extend_from_slice(&u64b(handle));
    out.extend_from_slice(&u32b(payload.len() as u32));
    out.extend_from_slice(payload);
    out
}

fn data_chunk(done: bool, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut payload = u64b(offset).to_vec();
    payload.extend_from_slice(data);
    chunk(done, proto::CHUNK_OFFSET_DATA, handle, &payload)
}

fn hole_chunk(done: bool, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut payload = u64b(offset).to_vec();
    payload.extend_from_slice(&u32b(length));
    chunk(done, proto::CHUNK_OFFSET_HOLE, handle, &payload)
}

fn read_command(offset: u64, length: u32) -> Command<'static> {
    Command {
        command: proto::CMD_READ,
        flags: 0,
        offset,
        length,
        payload: &[],
    }
}

#[tokio::test]
async fn read_chunks_in_any_order_fill_the_buffer() {
    let (client, mut server) = piped_client(true, None);
    let peer = tokio::spawn(async move {
        let (command, handle, offset, length) = read_request(&mut server).await;
        assert_eq!((command, offset, length), (proto::CMD_READ, 4096, 12288));
        let replies = [
            data_chunk(false, handle, 12288, &[0xab; 4096]),
            hole_chunk(false, handle, 4096, 4096),
            data_chunk(true, handle, 8192, &[0xcd; 4096]),
        ];
        for reply in replies {
            server.write_all(&reply).await.unwrap();
        }
        server
    });
    // The data lands at `start` of a larger buffer; bytes around it are left alone.
    let reply = client
        .call(
            &read_command(4096, 12288),
            Some(vec![0xff; 12288 + 100]),
            100,
        )
        .await
        .unwrap();
    peer.await.unwrap();
    assert_eq!(reply.error, None);
    let buf = reply.buf.unwrap();
    assert!(buf[..100].iter().all(|&b| b == 0xff));
    assert!(buf[100..4196].iter().all(|&b| b == 0));
    assert!(buf[4196..8292].iter().all(|&b| b == 0xcd));
    assert!(buf[8292..].iter().all(|&b| b == 0xab));
}

#[tokio::test]
async fn error_chunks_become_server_errors() {
    let (client, mut server) = piped_client(true, None);
    let peer = tokio::spawn(async move {
        let (_, handle, _, _) = read_request(&mut server).await;
        let mut payload = u32b(proto::EIO).to_vec();
        payload.extend_from_slice(&u16b(3));
        payload.extend_from_slice(b"bad");
        payload.extend_from_slice(&u64b(5000));
        server
            .write_all(&data_chunk(false, handle, 4096, &[1; 512]))
            .await
            .unwrap();
        server
            .write_all(&chunk(true, proto::CHUNK_ERROR_OFFSET, handle, &payload))
            .await
            .unwrap();
        server
    });
    let reply = client
        .call(&read_command(4096, 4096), Some(vec![0; 4096]), 0)
        .await
        .unwrap();
    peer.await.unwrap();
    assert_eq!(
        reply.error,
        Some(ServerError {
            code: proto::EIO,
            message: "bad".into(),
            offset: Some(5000)
        })
    );
    assert!(
        reply.buf.is_some(),
        "the buffer comes back with an error too"
    );
}

#[tokio::test]
async fn a_read_answered_in_part_is_a_protocol_error() {
    let (client, mut server) = piped_client(true, None);
    let peer = tokio::spawn(async move {
        let (_, handle, _, _) = read_request(&mut server).await;
        server
            .write_all(&data_chunk(true, handle, 0, &[1; 100]))
            .await
            .unwrap();
        server
    });
    let err = client
        .call(&read_command(0, 4096), Some(vec![0; 4096]), 0)
        .await
        .unwrap_err();
    let _server = peer.await.unwrap();
    assert!(
        matches!(&err, MoverError::Protocol { message, .. } if message.contains("100 bytes")),
        "{err}"
    );
}

#[tokio::test]
async fn a_data_chunk_outside_the_request_is_a_protocol_error() {
    let (client, mut server) = piped_client(true, None);
    let peer = tokio::spawn(async move {
        let (_, handle, _, _) = read_request(&mut server).await;
        server
            .write_all(&data_chunk(true, handle, 4000, &[1; 4096]))
            .await
            .unwrap();
        server
    });
    let err = client
        .call(&read_command(4096, 4096), Some(vec![0; 4096]), 0)
        .await
        .unwrap_err();
    let _server = peer.await.unwrap();
    assert!(matches!(err, MoverError::Protocol { .. }), "{err}");
}

#[tokio::test]
async fn block_status_keeps_only_base_allocation() {
    let (client, mut server) = piped_client(true, Some(1));
    let peer = tokio::spawn(async move {
        let (command, handle, _, _) = read_request(&mut server).await;
        assert_eq!(command, proto::CMD_BLOCK_STATUS);
        for (done, id, flags) in [(false, 9, 0), (true, 1, proto::STATE_ZERO)] {
            let mut payload = u32b(id).to_vec();
            payload.extend_from_slice(&u32b(65536));
            payload.extend_from_slice(&u32b(flags));
            server
                .write_all(&chunk(done, proto::CHUNK_BLOCK_STATUS, handle, &payload))
                .await
                .unwrap();
        }
        server
    });
    let cmd = Command {
        command: proto::CMD_BLOCK_STATUS,
        flags: 0,
        offset: 0,
        length: 65536,
        payload: &[],
    };
    let reply = client.call(&cmd, None, 0).await.unwrap();
    peer.await.unwrap();
    assert_eq!(
        reply.descriptors,
        vec![Descriptor {
            length: 65536,
            flags: proto::STATE_ZERO
        }]
    );
}

#[tokio::test]
async fn simple_replies_complete_requests_out_of_order() {
    let (client, mut server) = piped_client(false, None);
    let peer = tokio::spawn(async move {
        let first = read_request(&mut server).await;
        let second = read_request(&mut server).await;
        let (write, read) = if first.0 == proto::CMD_WRITE {
            (first, second)
        } else {
            (second, first)
        };
        // The read is answered first, then the write fails with ENOSPC.
        let mut reply = u32b(proto::SIMPLE_REPLY_MAGIC).to_vec();
        reply.extend_from_slice(&u32b(0));
        reply.extend_from_slice(&u64b(read.1));
        reply.extend_from_slice(&[7; 512]);
        reply.extend_from_slice(&u32b(proto::SIMPLE_REPLY_MAGIC));
        reply.extend_from_slice(&u32b(proto::ENOSPC));
        reply.extend_from_slice(&u64b(write.1));
        server.write_all(&reply).await.unwrap();
        server
    });
    let payload = [1u8; 512];
    let write = Command {
        command: proto::CMD_WRITE,
        flags: 0,
        offset: 0,
        length: 512,
        payload: &payload,
    };
    let read = read_command(512, 512);
    let (written, read) = tokio::join!(
        client.call(&write, None, 0),
        client.call(&read, Some(vec![0; 512]), 0)
    );
    peer.await.unwrap();
    assert_eq!(written.unwrap().error.map(|e| e.code), Some(proto::ENOSPC));
    assert_eq!(read.unwrap().buf.unwrap(), vec![7; 512]);
}

#[tokio::test]
async fn a_reply_for_an_unknown_handle_is_a_protocol_error() {
    let (client, mut server) = piped_client(false, None);
    let peer = tokio::spawn(async move {
        let (_, handle, _, _) = read_request(&mut server).await;
        let mut reply = u32b(proto::SIMPLE_REPLY_MAGIC).to_vec();
        reply.extend_from_slice(&u32b(0));
        reply.extend_from_slice(&u64b(handle + 1000));
        server.write_all(&reply).await.unwrap();
        server
    });
    let err = client
        .call(&read_command(0, 512), Some(vec![0; 512]), 0)
        .await
        .unwrap_err();
    let _server = peer.await.unwrap();
    assert!(
        matches!(&err, MoverError::Protocol { message, .. } if message.contains("unknown handle")),
        "{err}"
    );
}
