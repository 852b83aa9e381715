//! `ldm bench`'s machinery on the full SD1.5 architecture (random weights made in process) at
//! 64 pixels: every benchmark runs, and the operations it counts are exactly those PyTorch's
//! `FlopCounterMode` counts for diffusers' modules on the same shapes (numbers from
//! `tools/bench/side_by_side.py`'s `time_torch` at size 64).

use candle_core::{DType, Device};
use ldm_pipeline::bench::{measure, random_components, Arch, Part};

#[test]
fn sd15_benchmarks_count_what_pytorch_counts() -> ldm_pipeline::Result<()> {
    let c = random_components(Arch::Sd15, DType::F32, &Device::Cpu)?;
    for (part, torch_flops) in [
        (Part::Unet, 27_255_705_600u64),
        (Part::VaeDecode, 38_760_876_032),
        (Part::Text, 26_597_007_360),
    ] {
        let m = measure(&c, Arch::Sd15, part, 64, 2, 0, 1)?;
        assert_eq!(m.runs_ms.len(), 2);
        assert!(m.runs_ms.iter().all(|t| t.is_finite() && *t > 0.0));
        assert_eq!(m.flops, torch_flops, "{part:?}");
    }
    // A whole generation (2 steps) runs through the pipeline.
    let g = measure(&c, Arch::Sd15, Part::Generate, 64, 1, 0, 2)?;
    assert!(g.flops > 2 * 27_255_705_600);
    assert!(measure(&c, Arch::Sd15, Part::Unet, 60, 1, 0, 1).is_err());
    Ok(())
}
