"""Property-based checks of what parses untrusted input: any input gives a result or the one
clear error type, never another exception (hypothesis, 2000 examples per property)."""

from __future__ import annotations

import io
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tocom.compensator import PluginSpec
from tocom.compress import parse_schedule
from tocom.compress.flops import ViTDims
from tocom.models.metadata import MODEL_KWARGS, json_field, model_kwargs

EXAMPLES = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                max_size=3),
                    max_leaves=6)
# a metadata value: mostly JSON (valid or not quite), sometimes arbitrary text
VALUE = st.one_of(JSON.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=12))
SPEC_FIELDS = list(PluginSpec.__dataclass_fields__)
GOOD_SPEC = {"arch": "vit", "embed_dim": "64", "depth": "4", "num_heads": "4", "attn_dim": "64",
             "format": "tocom-compensator/1"}


@EXAMPLES
@given(st.dictionaries(st.sampled_from(SPEC_FIELDS + ["format", "other"]), VALUE, max_size=8))
def test_plugin_metadata_parses_or_refuses(changes):
    meta = {**GOOD_SPEC, **changes}
    try:
        spec = PluginSpec.from_metadata(meta, source="p.tocom.safetensors")
    except ValueError as err:
        assert "\n" not in str(err)
        return
    assert 1 <= spec.depth <= 1024 and 1 <= spec.rank <= 1024 and math.isfinite(spec.scale)
    assert isinstance(spec.recipe, dict) and isinstance(spec.arch, str)


@EXAMPLES
@given(st.dictionaries(st.sampled_from(list(MODEL_KWARGS) + ["checkpoint_path", "pretrained", "x"]),
                       JSON, max_size=6))
def test_model_kwargs_parse_or_refuse(kwargs):
    meta = {"model_kwargs": json.dumps(kwargs, allow_nan=True)}
    try:
        checked = model_kwargs(meta, "ck.safetensors")
    except ValueError as err:
        assert "ck.safetensors" in str(err)
        return
    assert set(checked) <= set(MODEL_KWARGS)


@EXAMPLES
@given(VALUE)
def test_json_fields_parse_or_refuse(value):
    try:
        out = json_field({"peft": value}, "peft", {}, dict, "ck.safetensors")
    except ValueError as err:
        assert "ck.safetensors" in str(err)
        return
    assert isinstance(out, dict)


DIMS = ViTDims(depth=12, embed_dim=192, mlp_hidden=768, num_patches=196, num_prefix=1)


@EXAMPLES
@given(st.one_of(st.text(max_size=12), st.text(alphabet="0123456789,:-.= flopsLOWhigh", max_size=14)),
       st.booleans())
def test_schedules_parse_or_refuse(text, with_dims):
    try:
        parse_schedule(text, DIMS if with_dims else None)
    except ValueError:
        pass


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 9), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()


@EXAMPLES
@given(st.one_of(st.binary(max_size=64),
                 st.tuples(st.integers(0, len(PNG) - 1), st.binary(min_size=1, max_size=8))
                 .map(lambda cut: PNG[:cut[0]] + cut[1] + PNG[cut[0] + len(cut[1]):]),
                 st.integers(0, len(PNG)).map(lambda n: PNG[:n])))
def test_image_bodies_decode_or_refuse(data):
    from tocom.serve.images import BadImage, decode_image

    try:
        image = decode_image(data)
    except BadImage as err:
        assert "\n" not in str(err)
        return
    assert image.mode == "RGB"
