"""The GPU-free logic of the TensorRT backend: engine cache keys, batch profiles, output shapes."""

import pytest

from services.detector.trt import batch_profile, engine_cache_key, output_shape

BASE = dict(model_sha256="a" * 64, gpu_name="NVIDIA H200", compute_capability=(9, 0), trt_version="10.9.0",
            precision="fp16", profile=(1, 8, 16), size=416)


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "b" * 64},
        {"gpu_name": "NVIDIA L4"},
        {"compute_capability": (8, 9)},
        {"trt_version": "10.10.0"},
        {"precision": "fp32"},
        {"profile": (1, 16, 32)},
        {"size": 640},
    ],
)
def test_any_change_that_invalidates_an_engine_misses_the_cache(change):
    assert engine_cache_key(**{**BASE, **change}) != engine_cache_key(**BASE)


def test_same_inputs_hit_the_cache():
    assert engine_cache_key(**BASE) == engine_cache_key(**dict(BASE))


def test_batch_profile():
    assert batch_profile(None, 16) == (1, 8, 16)
    assert batch_profile(None, 1) == (1, 1, 1)
    assert batch_profile(1, 16) == (1, 1, 1)  # a batch-1 export allows only batch 1


def test_output_shape_resolves_dynamic_batch():
    assert output_shape((-1, 3549, 85), 8) == (8, 3549, 85)
    assert output_shape((1, 300, 6), 1) == (1, 300, 6)
    with pytest.raises(ValueError):
        output_shape((-1, -1, 6), 2)
