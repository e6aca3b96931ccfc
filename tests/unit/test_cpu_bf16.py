"""Whether a CPU computes bf16 natively is decided by its flags, not by oneDNN's answer (True on
every AVX-512 CPU, where bf16 matmuls may be emulated and several times slower than fp32)."""
from __future__ import annotations

import pytest
import torch

from dtp_ds.train.ds_config import cpu_has_native_bf16

AVX2 = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2"
AVX512 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"


def x86(flags: str, cpus: int = 2) -> str:
    """/proc/cpuinfo of an x86 Linux machine with ``flags`` on every CPU."""
    return "".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nflags\t\t: {flags}\n"
                   f"bugs\t\t: spectre_v1\n\n" for i in range(cpus))


def arm(features: str) -> str:
    return f"processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n\n"


@pytest.fixture
def onednn_says(monkeypatch):
    """Make oneDNN's own bf16 check answer ``value`` (what it says on AVX-512 CPUs: True)."""
    def say(value: bool) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value, raising=False)
    return say


def test_avx2_only_is_not_native(onednn_says):
    onednn_says(False)
    assert cpu_has_native_bf16(x86(AVX2)) is False


def test_avx512_without_bf16_is_not_native_whatever_onednn_says(onednn_says):
    onednn_says(True)
    assert cpu_has_native_bf16(x86(AVX512)) is False


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_avx512_bf16_or_amx_is_native(onednn_says, flag):
    onednn_says(False)  # the flags decide either way
    assert cpu_has_native_bf16(x86(f"{AVX512} {flag} amx_tile")) is True


def test_aarch64_by_its_bf16_feature(onednn_says):
    onednn_says(True)
    assert cpu_has_native_bf16(arm("fp asimd aes sha2 crc32 atomics asimddp sve i8mm bf16")) is True
    # (a feature name that merely contains "bf16" does not count: only the BF16 extension itself)
    assert cpu_has_native_bf16(arm("fp asimd aes sha2 crc32 atomics asimddp svebf16")) is False


def test_without_readable_flags_onednn_decides(onednn_says):
    for value in (True, False):
        onednn_says(value)
        assert cpu_has_native_bf16("") is value  # not Linux: no /proc/cpuinfo


def test_this_machine_reads_its_own_flags(onednn_says):
    """With no argument, /proc/cpuinfo decides where it lists flags (oneDNN cannot)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    onednn_says(True)
    assert cpu_has_native_bf16() is cpu_has_native_bf16(text)
    onednn_says(False)
    assert cpu_has_native_bf16() is cpu_has_native_bf16(text)
