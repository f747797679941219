//! RTL8139C/C+ register offsets and bits (see shared/research/rtl8139-reference.md).

pub const IDR0: usize = 0x00;
pub const MAR0: usize = 0x08;
pub const TSD0: usize = 0x10;
pub const TSAD0: usize = 0x20;
pub const RBSTART: usize = 0x30;
pub const ERBCR: usize = 0x34;
pub const ERSR: usize = 0x36;
pub const CR: usize = 0x37;
pub const CAPR: usize = 0x38;
pub const CBR: usize = 0x3A;
pub const IMR: usize = 0x3C;
pub const ISR: usize = 0x3E;
pub const TCR: usize = 0x40;
pub const RCR: usize = 0x44;
pub const TCTR: usize = 0x48;
pub const MPC: usize = 0x4C;
pub const CFG9346: usize = 0x50;
pub const CONFIG0: usize = 0x51;
pub const CONFIG1: usize = 0x52;
pub const TIMERINT: usize = 0x54;
pub const MSR: usize = 0x58;
pub const CONFIG3: usize = 0x59;
pub const CONFIG4: usize = 0x5A;
pub const HLTCLK: usize = 0x5B;
pub const MULINT: usize = 0x5C;
pub const RERID: usize = 0x5E;
pub const TSAD_SUMMARY: usize = 0x60;
pub const BMCR: usize = 0x62;
pub const BMSR: usize = 0x64;
pub const ANAR: usize = 0x66;
pub const ANLPAR: usize = 0x68;
pub const ANER: usize = 0x6A;
pub const CSCR: usize = 0x74;
/// CSCR: link OK, and link changed since ISR.LinkChg was last acked (Linux's names:
/// CSCR_LinkOKBit, CSCR_LinkChangeBit).
pub const CSCR_LINK_OK: u32 = 0x0400;
pub const CSCR_LINK_CHANGED: u32 = 0x0800;
pub const CONFIG5: usize = 0xD8;
pub const TPPOLL: usize = 0xD9;
pub const CPCMD: usize = 0xE0;
pub const INTR_MITIGATE: usize = 0xE2;
pub const RDSAR: usize = 0xE4;
pub const ETTHR: usize = 0xEC;

/// CR bits.
pub const CR_RST: u8 = 0x10;
pub const CR_RE: u8 = 0x08;
pub const CR_TE: u8 = 0x04;
pub const CR_BUFE: u8 = 0x01;

/// ISR/IMR bits.
pub const INT_ROK: u16 = 1 << 0;
pub const INT_RER: u16 = 1 << 1;
pub const INT_TOK: u16 = 1 << 2;
pub const INT_TER: u16 = 1 << 3;
/// C mode: RX ring overflow. C+ mode: RX descriptor unavailable.
pub const INT_RXOVW: u16 = 1 << 4;
pub const INT_LINKCHG: u16 = 1 << 5;
pub const INT_FOVW: u16 = 1 << 6;
pub const INT_TDU: u16 = 1 << 7;
pub const INT_SWINT: u16 = 1 << 8;
pub const INT_TIMEOUT: u16 = 1 << 14;
pub const INT_SERR: u16 = 1 << 15;
/// Bits 12:9 are reserved and read-only.
pub const INT_MASK: u16 = 0xE1FF;

/// TSD bits.
pub const TSD_OWN: u32 = 1 << 13;
pub const TSD_TUN: u32 = 1 << 14;
pub const TSD_TOK: u32 = 1 << 15;
pub const TSD_TABT: u32 = 1 << 30;
pub const TSD_SIZE: u32 = 0x1FFF;

/// TCR.
pub const TCR_WRITABLE: u32 = 0x030F_07F0;
pub const TCR_LBK_SHIFT: u32 = 17;
pub const HWVER_8139C: u32 = 0x7400_0000;
pub const HWVER_8139CPLUS: u32 = 0x7480_0000;

/// RCR.
pub const RCR_WRITABLE: u32 = 0x0F03_FFBF;
pub const RCR_AAP: u32 = 1 << 0;
pub const RCR_APM: u32 = 1 << 1;
pub const RCR_AM: u32 = 1 << 2;
pub const RCR_AB: u32 = 1 << 3;
pub const RCR_WRAP: u32 = 1 << 7;

/// C-mode RX header status bits.
pub const RXS_ROK: u16 = 1 << 0;
pub const RXS_BAR: u16 = 1 << 13;
pub const RXS_PAM: u16 = 1 << 14;
pub const RXS_MAR: u16 = 1 << 15;

/// 9346CR.
pub const EEM_MASK: u8 = 0xC0;
pub const EEM_AUTOLOAD: u8 = 0x40;
pub const EEM_PROGRAM: u8 = 0x80;
pub const EEM_CONFIG_WRITE: u8 = 0xC0;
pub const EE_CS: u8 = 0x08;
pub const EE_SK: u8 = 0x04;
pub const EE_DI: u8 = 0x02;
pub const EE_DO: u8 = 0x01;

/// C+ command register.
pub const CPCMD_TXENB: u16 = 1 << 0;
pub const CPCMD_RXENB: u16 = 1 << 1;
pub const CPCMD_RXCHKSUM: u16 = 1 << 5;
pub const CPCMD_RXVLAN: u16 = 1 << 6;
pub const CPCMD_WRITABLE: u16 = 0x007B;

/// TPPoll.
pub const TPPOLL_HPQ: u8 = 1 << 7;
pub const TPPOLL_NPQ: u8 = 1 << 6;
pub const TPPOLL_FSWINT: u8 = 1 << 0;

/// C+ descriptor opts1 bits (shared).
pub const DESC_OWN: u32 = 1 << 31;
pub const DESC_EOR: u32 = 1 << 30;
pub const DESC_FS: u32 = 1 << 29;
pub const DESC_LS: u32 = 1 << 28;
/// TX command bits.
pub const TXD_LGSEN: u32 = 1 << 27;
pub const TXD_MSS_SHIFT: u32 = 16;
pub const TXD_MSS_MASK: u32 = 0x7FF;
pub const TXD_IPCS: u32 = 1 << 18;
pub const TXD_UDPCS: u32 = 1 << 17;
pub const TXD_TCPCS: u32 = 1 << 16;
pub const TXD_LEN_MASK: u32 = 0xFFFF;
/// TX status bits.
pub const TXD_UNF: u32 = 1 << 25;
pub const TXD_TES: u32 = 1 << 23;
/// opts2.
pub const TXD_TAGC: u32 = 1 << 17;
/// RX status.
pub const RXD_MAR: u32 = 1 << 26;
pub const RXD_PAM: u32 = 1 << 25;
pub const RXD_BAR: u32 = 1 << 24;
pub const RXD_PID_TCP: u32 = 1 << 16;
pub const RXD_PID_UDP: u32 = 2 << 16;
pub const RXD_PID_IP: u32 = 3 << 16;
pub const RXD_IPF: u32 = 1 << 15;
pub const RXD_UDPF: u32 = 1 << 14;
pub const RXD_TCPF: u32 = 1 << 13;
pub const RXD_BUF_MASK: u32 = 0x1FFF;
pub const RXD_TAVA: u32 = 1 << 16;

/// BMSR with the link up (100BASE-TX FD/HD, 10 FD/HD, AN capable/complete, link,
/// extended caps).
pub const BMSR_LINK_UP: u16 = 0x782D;
pub const BMSR_LINK: u16 = 0x0004;
pub const BMSR_AN_COMPLETE: u16 = 0x0020;
pub const ANAR_DEFAULT: u16 = 0x05E1;
