//! The NBD wire format: constants, and pure encoders and decoders over byte slices.
//!
//! Nothing here does I/O, so every message shape is unit-tested on its own. The connection code
//! (`client.rs`) reads a fixed-size header, asks this module what it means and how many payload
//! bytes follow, then reads exactly those bytes. Decoders return [`Malformed`] for input that
//! breaks the protocol; the caller names the peer with [`Malformed::at`], which gives the crate's
//! [`MoverError::Protocol`].
//!
//! All integers are big-endian (network byte order). Reference: `doc/proto.md` of the
//! `NetworkBlockDevice/nbd` project.

use crate::error::MoverError;

// Handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The second magic of the oldstyle handshake, which this client does not speak.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types. Errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information items of `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Bytes after the magic of a simple reply: error, handle.
pub const SIMPLE_REST_LEN: usize = 12;
/// Bytes after the magic of a structured reply chunk: flags, type, handle, length.
pub const STRUCTURED_REST_LEN: usize = 16;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR_BIT: u16 = 1 << 15;
pub const CHUNK_ERROR: u16 = CHUNK_ERROR_BIT | 1;
pub const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT | 2;

// The `base:allocation` metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values carried in replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Longest option reply or non-data reply chunk accepted: a peer announcing more is broken (a
/// block status reply of 32 MiB already describes four million extents).
pub const MAX_CONTROL_PAYLOAD: u32 = 32 << 20;

/// Input that breaks the protocol. [`Malformed::at`] turns it into the crate's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl Malformed {
    #[must_use]
    pub fn at(self, endpoint: &str) -> MoverError {
        MoverError::Protocol {
            endpoint: endpoint.to_owned(),
            message: self.0,
        }
    }
}

pub type Parsed<T> = Result<T, Malformed>;

fn malformed<T>(message: impl Into<String>) -> Parsed<T> {
    Err(Malformed(message.into()))
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

fn need(b: &[u8], len: usize, what: &str) -> Parsed<()> {
    if b.len() < len {
        return malformed(format!(
            "{what}: {} bytes, expected at least {len}",
            b.len()
        ));
    }
    Ok(())
}

/// The errno value of the local platform for an NBD error value. The values the protocol defines
/// are the Linux ones; anything else is treated as `EINVAL`, as the protocol asks of clients.
#[must_use]
pub fn errno(code: u32) -> u32 {
    let local = match code {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::EOPNOTSUPP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    };
    local.unsigned_abs()
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// Length of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;

/// The handshake flags of a fixed newstyle server greeting.
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Parsed<u16> {
    if be_u64(b, 0) != NBDMAGIC {
        return malformed("not an NBD server (bad greeting magic)");
    }
    match be_u64(b, 8) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return malformed("server speaks the oldstyle handshake only"),
        other => return malformed(format!("bad handshake magic {other:#x}")),
    }
    let flags = be_u16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return malformed("server does not support the fixed newstyle handshake");
    }
    Ok(flags)
}

/// Append one option request: `IHAVEOPT`, option, data length, data.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn push_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The data of `NBD_OPT_GO`: export name, then the information items asked for.
#[must_use]
pub fn encode_go(export: &str, info: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + export.len() + 2 * info.len());
    push_string32(&mut out, export);
    out.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for item in info {
        out.extend_from_slice(&item.to_be_bytes());
    }
    out
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: export name, then the context queries.
#[must_use]
pub fn encode_set_meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    push_string32(&mut out, export);
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        push_string32(&mut out, query);
    }
    out
}

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

/// An option reply header, checked against the option it must answer.
pub fn parse_option_reply(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
    option: u32,
) -> Parsed<OptionReplyHeader> {
    if be_u64(b, 0) != OPTION_REPLY_MAGIC {
        return malformed(format!("bad option reply magic {:#x}", be_u64(b, 0)));
    }
    let header = OptionReplyHeader {
        option: be_u32(b, 8),
        reply: be_u32(b, 12),
        length: be_u32(b, 16),
    };
    if header.option != option {
        return malformed(format!(
            "reply to option {} while waiting for option {option}",
            header.option
        ));
    }
    if header.length > MAX_CONTROL_PAYLOAD {
        return malformed(format!("option reply of {} bytes", header.length));
    }
    Ok(header)
}

/// A command's name as the protocol spells it, for messages.
#[must_use]
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "NBD command",
    }
}

/// What an option error reply type means, for messages.
#[must_use]
pub fn option_error_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by server policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not supported on the server platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "request too big",
        _ => "error",
    }
}

/// An information item of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An item this client did not ask for or does not use.
    Other(u16),
}

pub fn parse_info(b: &[u8]) -> Parsed<Info> {
    need(b, 2, "info reply")?;
    match be_u16(b, 0) {
        INFO_EXPORT => {
            if b.len() != 12 {
                return malformed(format!("export info of {} bytes, expected 12", b.len()));
            }
            Ok(Info::Export {
                size: be_u64(b, 2),
                flags: be_u16(b, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            if b.len() != 14 {
                return malformed(format!("block size info of {} bytes, expected 14", b.len()));
            }
            let (minimum, preferred, maximum) = (be_u32(b, 2), be_u32(b, 6), be_u32(b, 10));
            if !minimum.is_power_of_two()
                || !preferred.is_power_of_two()
                || preferred < minimum
                || maximum < preferred.max(minimum)
            {
                return malformed(format!(
                    "inconsistent block sizes: minimum {minimum}, preferred {preferred}, \
                     maximum {maximum}"
                ));
            }
            Ok(Info::BlockSize {
                minimum,
                preferred,
                maximum,
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// An `NBD_REP_META_CONTEXT` reply: context id and name.
pub fn parse_meta_context(b: &[u8]) -> Parsed<(u32, String)> {
    need(b, 4, "meta context reply")?;
    let name = String::from_utf8(b[4..].to_vec())
        .map_err(|_| Malformed("meta context name is not UTF-8".into()))?;
    Ok((be_u32(b, 0), name))
}

/// Length of the answer to `NBD_OPT_EXPORT_NAME` without the 124 reserved zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// The reserved bytes that follow unless `NBD_FLAG_C_NO_ZEROES` was agreed.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Size and transmission flags from the answer to `NBD_OPT_EXPORT_NAME`.
#[must_use]
pub fn parse_export_name_reply(b: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    (be_u64(b, 0), be_u16(b, 8))
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

#[must_use]
pub fn encode_request(r: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// Which kind of reply a reply magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Structured,
}

pub fn parse_reply_magic(b: [u8; 4]) -> Parsed<ReplyKind> {
    match u32::from_be_bytes(b) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        other => malformed(format!("bad reply magic {other:#010x}")),
    }
}

/// A simple reply after its magic: error value and handle.
#[must_use]
pub fn parse_simple_reply(b: &[u8; SIMPLE_REST_LEN]) -> (u32, u64) {
    (be_u32(b, 0), be_u64(b, 4))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub length: u32,
}

impl ChunkHeader {
    #[must_use]
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// A structured reply chunk header after its magic. Only `NBD_REPLY_TYPE_OFFSET_DATA` may carry a
/// payload larger than [`MAX_CONTROL_PAYLOAD`]; its length is checked against the request later.
pub fn parse_chunk_header(b: &[u8; STRUCTURED_REST_LEN]) -> Parsed<ChunkHeader> {
    let header = ChunkHeader {
        flags: be_u16(b, 0),
        kind: be_u16(b, 2),
        handle: be_u64(b, 4),
        length: be_u32(b, 12),
    };
    if header.kind != CHUNK_OFFSET_DATA && header.length > MAX_CONTROL_PAYLOAD {
        return malformed(format!(
            "reply chunk of type {} with {} bytes",
            header.kind, header.length
        ));
    }
    Ok(header)
}

/// Where the bytes of a data or hole chunk go in the caller's buffer: the chunk must lie inside
/// the request `[request_offset, request_offset + request_length)`. Returns the start index.
pub fn chunk_range(
    request_offset: u64,
    request_length: usize,
    chunk_offset: u64,
    chunk_length: u64,
) -> Parsed<usize> {
    let start = chunk_offset.checked_sub(request_offset);
    match start {
        Some(start)
            if chunk_length > 0
                && start
                    .checked_add(chunk_length)
                    .is_some_and(|end| end <= request_length as u64) =>
        {
            Ok(start as usize)
        }
        _ => malformed(format!(
            "reply chunk [{chunk_offset}, +{chunk_length}) outside the request \
             [{request_offset}, +{request_length})"
        )),
    }
}

/// Length of the offset that opens an `NBD_REPLY_TYPE_OFFSET_DATA` payload.
pub const OFFSET_DATA_PREFIX: u32 = 8;

/// The offset that opens an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; the data follows.
#[must_use]
pub fn parse_offset_data_prefix(b: &[u8; 8]) -> u64 {
    be_u64(b, 0)
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset and length of the hole.
pub fn parse_offset_hole(b: &[u8]) -> Parsed<(u64, u32)> {
    if b.len() != 12 {
        return malformed(format!("hole chunk of {} bytes, expected 12", b.len()));
    }
    Ok((be_u64(b, 0), be_u32(b, 8)))
}

/// An error reported in a structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// The NBD error value (see [`errno`]).
    pub code: u32,
    pub message: String,
    /// The offset the error applies to (`NBD_REPLY_TYPE_ERROR_OFFSET`).
    pub offset: Option<u64>,
}

/// The payload of an error chunk (`kind` has [`CHUNK_ERROR_BIT`] set). Error types this client
/// does not know are still errors: their error value and message are read the common way.
pub fn parse_error_chunk(kind: u16, b: &[u8]) -> Parsed<ChunkError> {
    need(b, 6, "error chunk")?;
    let code = be_u32(b, 0);
    if code == 0 {
        return malformed("error chunk with error value 0");
    }
    let len = usize::from(be_u16(b, 4));
    let Some(message) = b.get(6..6 + len) else {
        return malformed(format!("error message of {len} bytes in a shorter chunk"));
    };
    let message = String::from_utf8_lossy(message).into_owned();
    let rest = &b[6 + len..];
    let offset = match kind {
        CHUNK_ERROR if rest.is_empty() => None,
        CHUNK_ERROR_OFFSET if rest.len() == 8 => Some(be_u64(rest, 0)),
        CHUNK_ERROR | CHUNK_ERROR_OFFSET => {
            return malformed(format!("error chunk with {} trailing bytes", rest.len()))
        }
        _ => None,
    };
    Ok(ChunkError {
        code,
        message,
        offset,
    })
}

/// One run of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u32,
    pub flags: u32,
}

/// An `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id and its runs, in order.
pub fn parse_block_status(b: &[u8]) -> Parsed<(u32, Vec<Descriptor>)> {
    if b.len() < 12 || !(b.len() - 4).is_multiple_of(8) {
        return malformed(format!("block status chunk of {} bytes", b.len()));
    }
    let descriptors = b[4..]
        .chunks_exact(8)
        .map(|d| Descriptor {
            length: be_u32(d, 0),
            flags: be_u32(d, 4),
        })
        .collect::<Vec<_>>();
    if descriptors.iter().any(|d| d.length == 0) {
        return malformed("block status run of length 0");
    }
    Ok((be_u32(b, 0), descriptors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(second: u64, flags: u16) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&second.to_be_bytes());
        b[16..].copy_from_slice(&flags.to_be_bytes());
        b
    }

    #[test]
    fn greeting_is_checked() {
        let flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        assert_eq!(parse_greeting(&greeting(IHAVEOPT, flags)), Ok(flags));
        let old = parse_greeting(&greeting(OLDSTYLE_MAGIC, flags)).unwrap_err();
        assert!(old.0.contains("oldstyle"), "{old:?}");
        assert!(parse_greeting(&greeting(IHAVEOPT, FLAG_NO_ZEROES)).is_err());
        assert!(parse_greeting(&greeting(7, flags)).is_err());
        let mut http = greeting(IHAVEOPT, flags);
        http[..8].copy_from_slice(b"HTTP/1.1");
        assert!(parse_greeting(&http)
            .unwrap_err()
            .0
            .contains("not an NBD server"));
    }

    #[test]
    fn options_are_encoded() {
        let mut out = Vec::new();
        encode_option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(
            out,
            [0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 8, 0, 0, 0, 0]
        );
        assert_eq!(
            encode_go("ab", &[INFO_BLOCK_SIZE]),
            [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]
        );
        assert_eq!(
            encode_set_meta_context("", &["x:y"]),
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, b'x', b':', b'y']
        );
    }

    fn option_reply(magic: u64, option: u32, reply: u32, length: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&magic.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&reply.to_be_bytes());
        b[16..].copy_from_slice(&length.to_be_bytes());
        b
    }

    #[test]
    fn option_replies_are_checked() {
        let ok = option_reply(OPTION_REPLY_MAGIC, OPT_GO, REP_INFO, 12);
        assert_eq!(
            parse_option_reply(&ok, OPT_GO),
            Ok(OptionReplyHeader {
                option: OPT_GO,
                reply: REP_INFO,
                length: 12
            })
        );
        assert!(parse_option_reply(&ok, OPT_STRUCTURED_REPLY).is_err());
        let bad_magic = option_reply(IHAVEOPT, OPT_GO, REP_ACK, 0);
        assert!(parse_option_reply(&bad_magic, OPT_GO).is_err());
        let huge = option_reply(OPTION_REPLY_MAGIC, OPT_GO, REP_INFO, u32::MAX);
        assert!(parse_option_reply(&huge, OPT_GO).is_err());
        assert_eq!(option_error_name(REP_ERR_UNKNOWN), "unknown export");
    }

    #[test]
    fn info_items_are_parsed() {
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        assert_eq!(
            parse_info(&export),
            Ok(Info::Export {
                size: 1 << 30,
                flags: 3
            })
        );
        assert!(parse_info(&export[..11]).is_err());

        let block = |min: u32, pref: u32, max: u32| {
            let mut b = vec![0, 3];
            for v in [min, pref, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            parse_info(&b)
        };
        assert_eq!(
            block(1, 4096, 33_554_432),
            Ok(Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 33_554_432
            })
        );
        assert!(
            block(3, 4096, 1 << 20).is_err(),
            "minimum not a power of two"
        );
        assert!(block(512, 256, 1 << 20).is_err(), "preferred below minimum");
        assert!(block(512, 4096, 1024).is_err(), "maximum below preferred");
        assert_eq!(parse_info(&[0, 1, b'n']), Ok(Info::Other(1)));
        assert!(parse_info(&[0]).is_err());
    }

    #[test]
    fn meta_context_is_parsed() {
        let mut b = 7u32.to_be_bytes().to_vec();
        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(parse_meta_context(&b), Ok((7, BASE_ALLOCATION.to_owned())));
        assert!(parse_meta_context(&[0, 0, 1]).is_err());
        assert!(parse_meta_context(&[0, 0, 0, 1, 0xff]).is_err());
    }

    #[test]
    fn export_name_reply_is_parsed() {
        let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
        b[..8].copy_from_slice(&4096u64.to_be_bytes());
        b[8..].copy_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
        assert_eq!(parse_export_name_reply(&b), (4096, TFLAG_HAS_FLAGS));
    }

    #[test]
    fn requests_are_encoded() {
        let r = encode_request(&Request {
            flags: 0,
            command: CMD_READ,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 32,
            length: 65536,
        });
        assert_eq!(
            r,
            [
                0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 1, 0, 0, 0, 0,
                0, 1, 0, 0
            ]
        );
    }

    #[test]
    fn reply_headers_are_parsed() {
        assert_eq!(
            parse_reply_magic(SIMPLE_REPLY_MAGIC.to_be_bytes()),
            Ok(ReplyKind::Simple)
        );
        assert_eq!(
            parse_reply_magic(STRUCTURED_REPLY_MAGIC.to_be_bytes()),
            Ok(ReplyKind::Structured)
        );
        assert!(parse_reply_magic(REQUEST_MAGIC.to_be_bytes()).is_err());

        let mut simple = [0u8; SIMPLE_REST_LEN];
        simple[..4].copy_from_slice(&EPERM.to_be_bytes());
        simple[4..].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(parse_simple_reply(&simple), (EPERM, 9));

        let chunk = |kind: u16, length: u32| {
            let mut b = [0u8; STRUCTURED_REST_LEN];
            b[..2].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            b[2..4].copy_from_slice(&kind.to_be_bytes());
            b[4..12].copy_from_slice(&5u64.to_be_bytes());
            b[12..].copy_from_slice(&length.to_be_bytes());
            parse_chunk_header(&b)
        };
        let header = chunk(CHUNK_OFFSET_DATA, 1 << 30).unwrap();
        assert!(header.done());
        assert_eq!((header.kind, header.handle, header.length), (1, 5, 1 << 30));
        assert!(chunk(CHUNK_BLOCK_STATUS, 1 << 30).is_err());
    }

    #[test]
    fn chunk_ranges_stay_inside_the_request() {
        assert_eq!(chunk_range(4096, 8192, 4096, 8192), Ok(0));
        assert_eq!(chunk_range(4096, 8192, 8192, 4096), Ok(4096));
        assert!(chunk_range(4096, 8192, 0, 4096).is_err(), "before");
        assert!(chunk_range(4096, 8192, 8192, 4097).is_err(), "past the end");
        assert!(chunk_range(4096, 8192, 4096, 0).is_err(), "empty");
        assert!(
            chunk_range(0, 8192, u64::MAX, u64::MAX).is_err(),
            "overflow"
        );
    }

    #[test]
    fn hole_chunks_are_parsed() {
        let mut b = 4096u64.to_be_bytes().to_vec();
        b.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_offset_hole(&b), Ok((4096, 512)));
        assert!(parse_offset_hole(&b[..11]).is_err());
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&b[..8]);
        assert_eq!(parse_offset_data_prefix(&prefix), 4096);
    }

    #[test]
    fn error_chunks_are_parsed() {
        let mut b = EIO.to_be_bytes().to_vec();
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(b"no");
        assert_eq!(
            parse_error_chunk(CHUNK_ERROR, &b),
            Ok(ChunkError {
                code: EIO,
                message: "no".into(),
                offset: None
            })
        );
        assert!(
            parse_error_chunk(CHUNK_ERROR_OFFSET, &b).is_err(),
            "offset missing"
        );
        let mut with_offset = b.clone();
        with_offset.extend_from_slice(&512u64.to_be_bytes());
        assert_eq!(
            parse_error_chunk(CHUNK_ERROR_OFFSET, &with_offset)
                .unwrap()
                .offset,
            Some(512)
        );
        assert!(
            parse_error_chunk(CHUNK_ERROR, &with_offset).is_err(),
            "trailing bytes"
        );
        assert_eq!(
            parse_error_chunk(CHUNK_ERROR_BIT | 9, &with_offset)
                .unwrap()
                .code,
            EIO,
            "unknown error types are errors"
        );
        assert!(parse_error_chunk(CHUNK_ERROR, &b[..5]).is_err(), "short");
        assert!(
            parse_error_chunk(CHUNK_ERROR, &b[..7]).is_err(),
            "short message"
        );
        let mut zero = b.clone();
        zero[..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(
            parse_error_chunk(CHUNK_ERROR, &zero).is_err(),
            "error value 0"
        );
    }

    #[test]
    fn block_status_chunks_are_parsed() {
        let mut b = 1u32.to_be_bytes().to_vec();
        for (length, flags) in [(4096u32, STATE_HOLE | STATE_ZERO), (8192, 0)] {
            b.extend_from_slice(&length.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
        }
        assert_eq!(
            parse_block_status(&b),
            Ok((
                1,
                vec![
                    Descriptor {
                        length: 4096,
                        flags: 3
                    },
                    Descriptor {
                        length: 8192,
                        flags: 0
                    }
                ]
            ))
        );
        assert!(parse_block_status(&b[..4]).is_err(), "no runs");
        assert!(parse_block_status(&b[..15]).is_err(), "partial run");
        let mut empty_run = b.clone();
        empty_run[4..8].copy_from_slice(&0u32.to_be_bytes());
        assert!(parse_block_status(&empty_run).is_err());
    }

    #[test]
    fn errors_map_to_errno_and_protocol_errors() {
        assert_eq!(errno(EPERM), libc::EPERM as u32);
        assert_eq!(errno(ENOSPC), libc::ENOSPC as u32);
        assert_eq!(errno(ENOTSUP), libc::EOPNOTSUPP as u32);
        assert_eq!(errno(12345), libc::EINVAL as u32);
        let err = Malformed("bad".into()).at("nbd://h/x");
        assert!(
            matches!(&err, MoverError::Protocol { endpoint, message }
                if endpoint == "nbd://h/x" && message == "bad"),
            "{err}"
        );
    }
}
