"""splitq_vllm.families: one entry per supported family, read by calibration, loader and plugin."""

import pytest
from transformers import AutoModelForImageTextToText

from splitq_vllm.families import FAMILIES, family_of, family_of_config, group_spec
from splitq_vllm.model_layout import language_model_layers, linear_groups, source_tensor_files


def test_unknown_architecture_names_the_supported_ones():
    class MyVLMForConditionalGeneration:
        pass

    with pytest.raises(ValueError, match="'MyVLMForConditionalGeneration' is not supported by SplitQ; supported: Qwen2.5-VL"):
        family_of(MyVLMForConditionalGeneration)
    with pytest.raises(ValueError, match="LLaVA-1.5 \\(LlavaForConditionalGeneration\\)"):
        family_of_config(type("C", (), {"architectures": ["Other"]})())


def test_group_kinds_are_unique_and_every_family_has_a_full_attention_layer():
    for f in FAMILIES:
        for kind in f.kinds_by_name:
            assert group_spec(kind) == f.group(kind)
        assert f.layer_kinds


@pytest.mark.parametrize("which", ["qwen", "llava"])
def test_layers_and_groups_come_from_the_family(which, tiny_qwen_dir, tiny_llava_dir):
    src = tiny_qwen_dir if which == "qwen" else tiny_llava_dir
    model = AutoModelForImageTextToText.from_pretrained(src)
    prefix, layers = language_model_layers(model)
    assert prefix == family_of(model).layers and len(layers) == 2
    groups = linear_groups(model, list(source_tensor_files(src)))
    assert [g.kind for g in groups] == ["qkv", "o", "gate_up", "down"] * 2
