//! A minimal NFQUEUE client: one netlink socket bound to one queue, receiving the first bytes of each queued packet
//! and sending verdicts, many per datagram. Only what the WAN emulator needs, written against
//! `linux/netfilter/nfnetlink_queue.h` with the constants of the `libc` crate.
//!
//! Why not a crate: `nfq` (pure Rust, MIT/Apache) has the right model but keeps its socket private and blocks in
//! `recv`, so an emulator could not wait for "a packet or the next release time, whichever comes first" without
//! polling; this socket is non-blocking and gives its descriptor to `ppoll`.
//!
//! Messages (netlink header, then `nfgenmsg` with the queue number big-endian, then attributes of 4-byte-aligned
//! `len, type, payload`; numbers inside attributes are big-endian):
//! - config (once, acknowledged): bind the queue, copy `copy_range` bytes of each packet, queue length limit, and
//!   the GSO flag (the kernel hands large offloaded packets over whole instead of segmenting them first);
//! - packet (kernel to us): the packet id, the first bytes, the original length when it was cut;
//! - verdict (us to kernel): accept or drop packet `id`, in any order.
//!
//! A packet nobody gives a verdict stays queued in the kernel; closing the socket drops what is still queued.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::c_int;

const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// The attribute type without the "nested" and "network byte order" flag bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Largest datagram one verdict send carries (the socket's send buffer is about 200 KiB).
const VERDICT_SEND_BYTES_MAX: usize = 32 << 10;
/// Bytes of one verdict message: header, nfgenmsg, one attribute of 8 bytes.
const VERDICT_MSG_BYTES: usize = NLMSG_HDRLEN + NFGEN_HDRLEN + NLA_HDRLEN + 8;
/// The socket's receive buffer: room for about ten thousand queued-packet messages, so a burst arriving while the
/// emulator releases others is not lost (overruns are counted).
const RECV_BUFFER_BYTES: c_int = 8 << 20;

/// The netlink message at offset `at` of a received datagram: its type and body; `None` if fewer than a header's
/// bytes are left or its length field does not fit the datagram.
fn message_at(datagram: &[u8], at: usize) -> Option<(u16, &[u8])> {
    let buf = datagram.get(at..).filter(|b| b.len() >= NLMSG_HDRLEN)?;
    let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let msg_type = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
    if len < NLMSG_HDRLEN || len > buf.len() {
        return None;
    }
    Some((msg_type, &buf[NLMSG_HDRLEN..len]))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn queue_msg_type(msg: c_int) -> u16 {
    ((libc::NFNL_SUBSYS_QUEUE << 8) | msg) as u16
}

/// One queued packet as the kernel reported it.
pub struct Packet<'a> {
    pub id: u32,
    /// The first bytes of the packet (up to the copy range), from its IP header on.
    pub head: &'a [u8],
    /// The packet's whole length.
    pub len: u32,
}

/// What went wrong on the socket without stopping it.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueCounters {
    /// Error acknowledgements from the kernel (a verdict for an unknown id).
    pub errors: u64,
    /// Times the socket's receive buffer overflowed (the kernel dropped those packets and counts them too).
    pub overruns: u64,
    /// Messages too short or malformed to parse.
    pub malformed: u64,
}

pub struct NfQueue {
    fd: OwnedFd,
    queue: u16,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
    pub counters: QueueCounters,
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn put_header(buf: &mut Vec<u8>, msg_type: u16, flags: u16, queue: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0 is the kernel
    buf.push(libc::AF_UNSPEC as u8);
    buf.push(libc::NFNETLINK_V0 as u8);
    buf.extend_from_slice(&queue.to_be_bytes());
    start
}

fn put_attr(buf: &mut Vec<u8>, attr_type: c_int, payload: &[u8]) {
    let len = NLA_HDRLEN + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&(attr_type as u16).to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + align4(len) - len, 0);
}

fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn be32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

impl NfQueue {
    /// Binds queue `queue`: each packet's first `copy_range` bytes are delivered, at most `queue_len_max` packets
    /// wait for a verdict (the kernel drops what comes beyond and counts it).
    pub fn open(queue: u16, copy_range: u32, queue_len_max: u32) -> io::Result<Self> {
        // SAFETY: plain system calls on a descriptor this function owns; pointers are to live locals.
        let fd = unsafe {
            let raw =
                check(libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER))?;
            OwnedFd::from_raw_fd(raw)
        };
        // SAFETY: all-zero is a valid sockaddr_nl (port id 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        })?;
        // SAFETY: an int option of the size passed.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&RECV_BUFFER_BYTES as *const c_int).cast(),
                std::mem::size_of::<c_int>() as u32,
            )
        })?;
        let mut q = NfQueue {
            fd,
            queue,
            recv_buf: vec![0; 64 << 10],
            send_buf: Vec::with_capacity(VERDICT_SEND_BYTES_MAX + VERDICT_MSG_BYTES),
            counters: QueueCounters::default(),
        };
        let mut msg = Vec::new();
        let start = put_header(
            &mut msg,
            queue_msg_type(libc::NFQNL_MSG_CONFIG),
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            queue,
        );
        // struct nfqnl_msg_config_cmd { u8 command; u8 pad; be16 pf }
        put_attr(&mut msg, libc::NFQA_CFG_CMD, &[libc::NFQNL_CFG_CMD_BIND as u8, 0, 0, 0]);
        // struct nfqnl_msg_config_params { be32 copy_range; u8 copy_mode } (packed)
        let mut params = copy_range.to_be_bytes().to_vec();
        params.push(libc::NFQNL_COPY_PACKET as u8);
        put_attr(&mut msg, libc::NFQA_CFG_PARAMS, &params);
        put_attr(&mut msg, libc::NFQA_CFG_QUEUE_MAXLEN, &queue_len_max.to_be_bytes());
        put_attr(&mut msg, libc::NFQA_CFG_MASK, &(libc::NFQA_CFG_F_GSO as u32).to_be_bytes());
        put_attr(&mut msg, libc::NFQA_CFG_FLAGS, &(libc::NFQA_CFG_F_GSO as u32).to_be_bytes());
        finish(&mut msg, start);
        q.send(&msg)?;
        q.wait_ack()?;
        Ok(q)
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr_nl (port id 0: the kernel).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `bytes` and `addr` are live for the call and their sizes are passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads until the acknowledgement of the config message: its error code, 0 for success.
    fn wait_ack(&mut self) -> io::Result<()> {
        loop {
            let n = self.recv(0)?;
            let mut at = 0;
            while let Some((msg_type, body)) = message_at(&self.recv_buf[..n], at) {
                if msg_type == libc::NLMSG_ERROR as u16 && body.len() >= 4 {
                    let code = i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes"));
                    return if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) };
                }
                at += align4(NLMSG_HDRLEN + body.len());
            }
        }
    }

    /// One datagram into the receive buffer; its length.
    fn recv(&mut self, flags: c_int) -> io::Result<usize> {
        loop {
            // SAFETY: the buffer is live and its length is passed.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), self.recv_buf.as_mut_ptr().cast(), self.recv_buf.len(), flags)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    self.counters.overruns += 1;
                    continue;
                }
                _ => return Err(err),
            }
        }
    }

    /// Hands every packet waiting on the socket to `each`, without blocking; how many there were.
    pub fn receive(&mut self, mut each: impl FnMut(Packet<'_>)) -> io::Result<usize> {
        let mut packets = 0;
        loop {
            let n = match self.recv(libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(packets),
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while n - at >= NLMSG_HDRLEN {
                let Some((msg_type, body)) = message_at(&self.recv_buf[..n], at) else {
                    self.counters.malformed += 1;
                    break;
                };
                let len = NLMSG_HDRLEN + body.len();
                if msg_type == libc::NLMSG_ERROR as u16 {
                    if body.get(..4).is_some_and(|c| c != [0; 4]) {
                        self.counters.errors += 1;
                    }
                } else if msg_type == queue_msg_type(libc::NFQNL_MSG_PACKET) {
                    match parse_packet(body) {
                        Some(packet) => {
                            packets += 1;
                            each(packet);
                        }
                        None => self.counters.malformed += 1,
                    }
                }
                at += align4(len);
            }
        }
    }

    /// Queues a verdict for packet `id`; sent by [`NfQueue::flush`] (or once the batch is full).
    pub fn verdict(&mut self, id: u32, accept: bool) -> io::Result<()> {
        if self.send_buf.len() + VERDICT_MSG_BYTES > VERDICT_SEND_BYTES_MAX {
            self.flush()?;
        }
        let start = put_header(
            &mut self.send_buf,
            queue_msg_type(libc::NFQNL_MSG_VERDICT),
            libc::NLM_F_REQUEST as u16,
            self.queue,
        );
        // struct nfqnl_msg_verdict_hdr { be32 verdict; be32 id }
        let verdict = if accept { libc::NF_ACCEPT } else { libc::NF_DROP } as u32;
        let mut payload = [0u8; 8];
        payload[..4].copy_from_slice(&verdict.to_be_bytes());
        payload[4..].copy_from_slice(&id.to_be_bytes());
        put_attr(&mut self.send_buf, libc::NFQA_VERDICT_HDR, &payload);
        finish(&mut self.send_buf, start);
        Ok(())
    }

    /// Sends the verdicts queued so far, in one datagram.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.send_buf.is_empty() {
            return Ok(());
        }
        let result = self.send(&self.send_buf);
        self.send_buf.clear();
        result
    }
}

impl AsRawFd for NfQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The id, head and length of a packet message's attributes; `None` without a packet header.
fn parse_packet(mut attrs: &[u8]) -> Option<Packet<'_>> {
    attrs = attrs.get(NFGEN_HDRLEN..)?;
    let (mut id, mut head, mut cap_len) = (None, &[][..], None);
    while attrs.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let attr_type = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN {
            return None;
        }
        let payload = attrs.get(NLA_HDRLEN..len)?;
        match attr_type as c_int {
            libc::NFQA_PACKET_HDR => id = be32(payload),
            libc::NFQA_PAYLOAD => head = payload,
            libc::NFQA_CAP_LEN => cap_len = be32(payload),
            _ => {}
        }
        attrs = attrs.get(align4(len).min(attrs.len())..)?;
    }
    Some(Packet { id: id?, head, len: cap_len.unwrap_or(head.len() as u32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message body (after the netlink header) as the kernel builds it.
    fn packet_body(id: u32, head: &[u8], cap_len: Option<u32>) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 1]); // hw protocol, hook
        put_attr(&mut body, libc::NFQA_PACKET_HDR, &hdr);
        if let Some(len) = cap_len {
            put_attr(&mut body, libc::NFQA_CAP_LEN, &len.to_be_bytes());
        }
        put_attr(&mut body, libc::NFQA_PAYLOAD, head);
        body
    }

    #[test]
    fn packet_messages_parse_to_id_head_and_length() {
        let head = [0x45u8; 20];
        let body = packet_body(77, &head, Some(1500));
        let p = parse_packet(&body).unwrap();
        assert_eq!((p.id, p.head, p.len), (77, &head[..], 1500));
        let body = packet_body(78, &head[..9], None);
        let p = parse_packet(&body).unwrap();
        assert_eq!((p.id, p.head.len(), p.len), (78, 9, 9));
    }

    #[test]
    fn malformed_packet_messages_are_refused() {
        let body = packet_body(1, &[1, 2, 3], None);
        // Cut inside an attribute, an attribute claiming more than there is, no packet header at all.
        assert!(parse_packet(&body[..body.len() - 4]).is_none());
        let mut long = body.clone();
        long[4] = 200;
        assert!(parse_packet(&long).is_none());
        let mut no_header = vec![0u8; 4];
        put_attr(&mut no_header, libc::NFQA_PAYLOAD, &[1, 2]);
        assert!(parse_packet(&no_header).is_none());
        let mut zero_len = vec![0u8; 4];
        zero_len.extend_from_slice(&[0, 0, 1, 0]);
        assert!(parse_packet(&zero_len).is_none());
    }

    #[test]
    fn verdicts_are_well_formed_messages() {
        let mut buf = Vec::new();
        let start = put_header(&mut buf, queue_msg_type(libc::NFQNL_MSG_VERDICT), libc::NLM_F_REQUEST as u16, 3);
        put_attr(&mut buf, libc::NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 9]);
        finish(&mut buf, start);
        assert_eq!(buf.len(), VERDICT_MSG_BYTES);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize, VERDICT_MSG_BYTES);
        assert_eq!(&buf[18..20], &3u16.to_be_bytes(), "queue number big-endian in nfgenmsg");
    }
}
