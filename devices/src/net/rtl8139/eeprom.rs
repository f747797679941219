//! The 93C46 serial EEPROM (64 x 16 bits) behind the 9346CR register.
//!
//! The driver bit-bangs CS/SK/DI and reads DO. Commands are a start bit, a 2-bit
//! opcode and a 6-bit address, clocked MSB first on rising SK edges; leading zeros
//! before the start bit are skipped (8139too sends two). After a READ the data comes
//! out MSB first, one bit per rising edge, and the part goes back to waiting for a
//! command (no CS toggle needed, as FreeBSD expects).

pub const WORDS: usize = 64;
const ADDR_BITS: u32 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// CS low.
    Idle,
    /// Collecting start bit + opcode + address.
    Command,
    /// Shifting out a word.
    Read,
    /// Collecting 16 data bits for WRITE / WRAL.
    WriteData,
}

#[derive(Debug, Clone)]
pub struct Eeprom {
    pub contents: [u16; WORDS],
    mode: Mode,
    /// Bits collected (Command/WriteData) or remaining (Read).
    tick: u32,
    input: u32,
    output: u16,
    address: u8,
    write_all: bool,
    write_enabled: bool,
    cs: bool,
    sk: bool,
    pub eedo: bool,
}

impl Eeprom {
    /// The layout QEMU and the drivers agree on: ID 0x8129, vendor, device, MAC at
    /// words 7-9 (little-endian byte pairs).
    pub fn new(mac: [u8; 6], vendor: u16, device: u16) -> Self {
        let mut contents = [0u16; WORDS];
        contents[0] = 0x8129;
        contents[1] = vendor;
        contents[2] = device;
        for i in 0..3 {
            contents[7 + i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
        }
        Self {
            contents,
            mode: Mode::Idle,
            tick: 0,
            input: 0,
            output: 0,
            address: 0,
            write_all: false,
            write_enabled: false,
            cs: false,
            sk: false,
            eedo: false,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        for i in 0..3 {
            let b = self.contents[7 + i].to_le_bytes();
            m[2 * i] = b[0];
            m[2 * i + 1] = b[1];
        }
        m
    }

    /// Drive the pins (9346CR bits EECS, EESK, EEDI).
    pub fn set_pins(&mut self, cs: bool, sk: bool, di: bool) {
        let rising_cs = cs && !self.cs;
        let rising_sk = sk && !self.sk;
        self.cs = cs;
        self.sk = sk;
        if !cs {
            self.mode = Mode::Idle;
            self.eedo = false;
            return;
        }
        if rising_cs {
            self.enter_command();
            // Ready (DO high) after a write cycle, which we complete instantly.
            self.eedo = true;
        }
        if !rising_sk {
            return;
        }
        match self.mode {
            Mode::Idle => {}
            Mode::Command => {
                if self.tick == 0 && !di {
                    // Leading zero before the start bit.
                    return;
                }
                self.input = (self.input << 1) | di as u32;
                self.tick += 1;
                if self.tick == 3 + ADDR_BITS {
                    self.decode();
                }
            }
            Mode::Read => {
                self.eedo = self.output & 0x8000 != 0;
                self.output <<= 1;
                self.tick -= 1;
                if self.tick == 0 {
                    // FreeBSD reads the next command without toggling CS.
                    self.enter_command();
                }
            }
            Mode::WriteData => {
                self.input = (self.input << 1) | di as u32;
                self.tick += 1;
                if self.tick == 16 {
                    let v = self.input as u16;
                    if self.write_enabled {
                        if self.write_all {
                            self.contents = [v; WORDS];
                        } else {
                            self.contents[self.address as usize] = v;
                        }
                    }
                    self.eedo = true;
                    self.enter_command();
                }
            }
        }
    }

    fn enter_command(&mut self) {
        self.mode = Mode::Command;
        self.tick = 0;
        self.input = 0;
    }

    fn decode(&mut self) {
        let op = (self.input >> ADDR_BITS) & 3;
        let addr = (self.input & ((1 << ADDR_BITS) - 1)) as u8;
        self.address = addr;
        match op {
            0b10 => {
                // READ: a dummy 0 is on DO now; 16 data bits follow.
                self.output = self.contents[addr as usize];
                self.eedo = false;
                self.mode = Mode::Read;
                self.tick = 16;
            }
            0b01 => {
                self.write_all = false;
                self.mode = Mode::WriteData;
                self.tick = 0;
                self.input = 0;
            }
            0b11 => {
                if self.write_enabled {
                    self.contents[addr as usize] = 0xFFFF;
                }
                self.eedo = true;
                self.enter_command();
            }
            _ => {
                match addr >> (ADDR_BITS - 2) {
                    0b11 => self.write_enabled = true,
                    0b00 => self.write_enabled = false,
                    0b01 => {
                        self.write_all = true;
                        self.mode = Mode::WriteData;
                        self.tick = 0;
                        self.input = 0;
                        return;
                    }
                    _ => {
                        if self.write_enabled {
                            self.contents = [0xFFFF; WORDS];
                        }
                    }
                }
                self.enter_command();
            }
        }
    }
}
