//! Legacy PC devices: the 8250 UART (through vm-superio), the i8042 reset line, and
//! the debug-exit port.
