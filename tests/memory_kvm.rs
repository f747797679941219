//! The registry against the real KVM (`/dev/kvm`): slot ids, the host limit, read-only
//! slots, failures. Skipped, loudly, when `/dev/kvm` cannot be opened.

use std::sync::Arc;

use kvm_ioctls::Kvm;
use wbvmm::memory::{
    GuestRamDma, MemoryError, SlotBackend, SlotFlags, SlotIndexKind, SlotRegistry,
};
use wbvmm_devices::GuestDma;

fn kvm_vm() -> Option<kvm_ioctls::VmFd> {
    match Kvm::new().and_then(|k| k.create_vm()) {
        Ok(vm) => Some(vm),
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot open /dev/kvm or create a VM ({e}); KVM memslot tests not run"
            );
            None
        }
    }
}

#[test]
fn kvm_registry_add_remove_grow() {
    let Some(vm) = kvm_vm() else { return };
    let vm = Arc::new(vm);
    let limit = vm.max_slots();
    eprintln!("KVM_CAP_NR_MEMSLOTS = {limit}");
    assert!(limit >= 32);
    let reg = Arc::new(SlotRegistry::new(vm.clone(), SlotIndexKind::Wbtree));
    // 600 one-page slots: past the old 32 and 509 limits when the host allows it.
    let n = 600.min(limit);
    let mut ids = Vec::new();
    for i in 0..n as u64 {
        ids.push(
            reg.add_ram(0x1_0000_0000 + i * 0x2000, 0x1000, SlotFlags::NONE)
                .unwrap(),
        );
    }
    assert_eq!(reg.len(), n as usize);
    let rom = reg.add_ram(0xfffc_0000, 0x4_0000, SlotFlags::READONLY);
    let dma = GuestRamDma::new(reg.clone());
    dma.write(0x1_0000_0ff0, &[7; 0x10]).unwrap();
    let mut b = [0u8; 0x10];
    dma.read(0x1_0000_0ff0, &mut b).unwrap();
    assert_eq!(b, [7; 0x10]);
    if let Ok(rom) = rom {
        assert!(dma.write(0xfffc_0000, &[1]).is_err());
        reg.remove(rom).unwrap();
    }
    // Overlaps are rejected before KVM is asked.
    let e = reg
        .add_ram(0x1_0000_0000, 0x1000, SlotFlags::NONE)
        .unwrap_err();
    assert!(matches!(e, MemoryError::Overlap { .. }), "{e}");
    for id in ids.iter().step_by(2) {
        reg.remove(*id).unwrap();
    }
    let again = reg.add_ram(0x2_0000_0000, 0x1000, SlotFlags::NONE).unwrap();
    assert_eq!(again, ids[0], "lowest free id reused");
    reg.resize(again, 0x3000).unwrap();
    reg.move_slot(again, 0x3_0000_0000).unwrap();
    reg.set_dirty_log(again, true).unwrap();
    assert_eq!(reg.slot(again).unwrap().gpa, 0x3_0000_0000);
}
