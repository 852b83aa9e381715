//! Which device a command computes on: `--device cpu|cuda[:N]|auto`. `auto` (the default)
//! takes the first GPU when this build has CUDA and one is present, else the CPU. Asking for
//! CUDA from a CPU-only build, or from a machine without a GPU, is an error that says how to
//! get one — never a silent fall-back to the CPU.

use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The GPU when this build has CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("unknown device `{s}` (cpu, cuda, cuda:N or auto)")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// How to get a CUDA build, for error messages.
pub const CUDA_BUILD_HINT: &str = "build with `tools/cuda/build.sh` (or `cargo build --release \
--features ldm-cli/cuda` with the CUDA compiler on PATH; docs/cuda.md)";

/// The device for `choice`.
pub fn select(choice: DeviceChoice) -> crate::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if cuda_built() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        DeviceChoice::Cuda(n) if !cuda_built() => Err(crate::Error::InvalidRequest(format!(
            "--device cuda:{n}: this ldm was built without CUDA; {CUDA_BUILD_HINT}"
        ))),
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            // The driver's own words, without the backtrace candle attaches.
            let e = match e {
                candle_core::Error::WithBacktrace { inner, .. } => *inner,
                e => e,
            };
            crate::Error::InvalidRequest(format!(
                "--device cuda:{n}: no usable CUDA device ({e}); --device cpu computes on the CPU"
            ))
        }),
    }
}

/// `cpu` or `cuda:N`, for logs and reports.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_the_rest() {
        for (s, want) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("gpu", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(want), "{s}");
            if s != "CPU" && s != "gpu" && s != "cuda" {
                assert_eq!(want.to_string(), s);
            }
        }
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "metal"] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("cpu, cuda"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_and_auto_always_work_and_cuda_is_never_a_silent_cpu() {
        assert!(select(DeviceChoice::Cpu).unwrap().is_cpu());
        let auto = select(DeviceChoice::Auto).unwrap();
        assert!(auto.is_cpu() || cuda_built());
        match select(DeviceChoice::Cuda(0)) {
            Ok(d) => assert!(d.is_cuda()),
            Err(e) => {
                let msg = e.to_string();
                if cuda_built() {
                    assert!(msg.contains("no usable CUDA device"), "{msg}");
                } else {
                    assert!(msg.contains("built without CUDA"), "{msg}");
                    assert!(msg.contains("tools/cuda/build.sh"), "{msg}");
                }
            }
        }
        assert_eq!(describe(&Device::Cpu), "cpu");
    }
}
