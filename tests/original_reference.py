"""Original LLaVA (haotian-liu/LLaVA) checkpoints and the tests' reference for them.

`write_original` writes an original-format checkpoint directory (config.json with mm_* keys, weights
under the original module names, safetensors or .bin) plus its CLIP directory, from a tiny llava-hf
model's weights. `OriginalReference` runs such a directory with the original code wherever it runs
here: the original model classes (LlavaLlamaForCausalLM) need an older transformers, so the reference
is assembled from the parts they are made of:

- the vision tower: the original `CLIPVisionTower`, loading transformers' CLIPVisionModel from the
  CLIP directory (then, as `from_pretrained` does, the checkpoint's own tower tensors over it);
- the projector: the original `build_vision_projector`;
- merge and splice: the original `LlavaMetaForCausalLM.encode_images` and
  `prepare_inputs_labels_for_multimodal`, called on a stand-in `self`;
- the language model: transformers' LlamaForCausalLM / MistralForCausalLM, which the original
  LlavaLlamaForCausalLM / LlavaMistralForCausalLM subclass without changing their arithmetic.

Every module is filled with `load_state_dict(strict=True)` from the written files, so the key names
are checked by the original modules themselves.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.llava_arch import LlavaMetaForCausalLM
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.model.multimodal_projector.builder import build_vision_projector

TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _text_config_dict(text_config) -> dict:
    """The text model's fields as an original config.json lists them (rope_theta, not rope_parameters)."""
    d = {k: getattr(text_config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                               "rms_norm_eps", "hidden_act", "tie_word_embeddings")}  # fmt: skip
    d["rope_theta"] = (text_config.rope_parameters or {}).get("rope_theta", 10000.0)
    d["rope_scaling"] = None
    if text_config.model_type == "mistral":
        d["sliding_window"] = text_config.sliding_window
    return d


def write_clip_dir(directory: str, vision_tower: torch.nn.Module, tile: int, full_clip: bool = False) -> str:
    """A CLIP directory: config.json, weights, preprocessor_config.json. Either a CLIPVisionModel as
    transformers 5 saves it (bare embeddings.* / encoder.* keys), or a full CLIPModel as
    openai/clip-vit-large-patch14-336 ships (vision_model.* and text_model.* keys, a "clip" config)."""
    os.makedirs(directory, exist_ok=True)
    if not full_clip:
        vision = transformers.CLIPVisionModel(vision_tower.config).eval()
        vision.load_state_dict(vision_tower.state_dict())
        vision.save_pretrained(directory)
    else:  # what openai/clip-vit-large-patch14-336 ships: vision_config nested in a "clip" config
        full = transformers.CLIPConfig(vision_config=vision_tower.config.to_dict(),
                                       text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, vocab_size=50))  # fmt: skip
        model = transformers.CLIPModel(full)
        model.vision_model.load_state_dict(vision_tower.state_dict())
        model.save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}).save_pretrained(
        directory
    )
    return directory


def write_original(directory: str, hf_model, clip_dir: str, *, projector_type: str = "mlp2x_gelu",
                   projector_state: dict | None = None, tower_state: dict | None = None, weights: str = "safetensors",
                   mm_vision_tower: str | None = None, **mm) -> str:  # fmt: skip
    """An original-format checkpoint with hf_model's text model (and projector, image_newline).

    projector_state: the original projector's state_dict (needed for projector types llava-hf lacks);
    tower_state: a CLIPVisionModel state_dict, stored in the checkpoint itself under TOWER_PREFIX;
    weights: "safetensors", "bin" (pytorch_model.bin) or "bin-sharded" (with pytorch_model.bin.index.json);
    mm: config.json keys (mm_patch_merge_type, image_aspect_ratio, image_grid_pinpoints, ...).
    """
    os.makedirs(directory, exist_ok=True)
    text_config = hf_model.config.text_config
    is_mistral = text_config.model_type == "mistral"
    tensors = {}
    for key, value in hf_model.state_dict().items():
        if key.startswith("model.language_model."):
            tensors["model." + key[len("model.language_model."):]] = value
        elif key == "lm_head.weight":
            tensors[key] = value
        elif key == "model.image_newline":
            tensors[key] = value
    if projector_state is None:
        assert projector_type == "mlp2x_gelu"
        proj = hf_model.model.multi_modal_projector
        projector_state = {"0.weight": proj.linear_1.weight, "0.bias": proj.linear_1.bias,
                           "2.weight": proj.linear_2.weight, "2.bias": proj.linear_2.bias}  # fmt: skip
    tensors.update({f"model.mm_projector.{k}": v for k, v in projector_state.items()})
    if tower_state is not None:
        tensors.update({TOWER_PREFIX + k: v for k, v in tower_state.items()})
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    vision = hf_model.config.vision_config
    config = {
        **_text_config_dict(text_config),
        "architectures": ["LlavaMistralForCausalLM" if is_mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if is_mistral else "llava",
        "mm_vision_tower": mm_vision_tower or clip_dir,
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": projector_type,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "unfreeze_mm_vision_tower": tower_state is not None,
        **mm,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _write_weights(directory, tensors, weights)
    return directory


def _write_weights(directory: str, tensors: dict, weights: str):
    if weights == "safetensors":
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
    elif weights == "bin-sharded":
        keys = sorted(tensors)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, names in shards.items():
            torch.save({k: tensors[k] for k in names}, os.path.join(directory, name))
        index = {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}
        with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
            json.dump(index, f)
    else:
        raise ValueError(weights)


def read_weights(directory: str) -> dict:
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return load_file(os.path.join(directory, "model.safetensors"))
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".bin"):
            out.update(torch.load(os.path.join(directory, name), weights_only=True))
    return out


class OriginalReference:
    """The original LLaVA's forward for an original-format directory (see the module docstring)."""

    def __init__(self, directory: str, clip_dir: str):
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        self.config = types.SimpleNamespace(**cfg)
        tensors = read_weights(directory)
        self.tower = CLIPVisionTower(clip_dir, args=self.config)  # loads the CLIP directory
        own_tower = {k[len(TOWER_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOWER_PREFIX)}
        if own_tower:
            self.tower.vision_tower.load_state_dict(own_tower, strict=True)
        self.tower.eval()
        self.projector = build_vision_projector(self.config).eval()
        self.projector.load_state_dict(_under(tensors, "model.mm_projector."), strict=True)
        text_cls = transformers.MistralConfig if cfg["model_type"] == "llava_mistral" else transformers.LlamaConfig
        lm_cls = (transformers.MistralForCausalLM if cfg["model_type"] == "llava_mistral"
                  else transformers.LlamaForCausalLM)  # fmt: skip
        text_keys = {k: v for k, v in tensors.items()
                     if k == "lm_head.weight" or (k.startswith("model.") and not k.startswith(("model.mm_projector.",
                     "model.vision_tower.", "model.image_newline")))}  # fmt: skip
        self.lm = lm_cls(text_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})).eval()
        self.lm.load_state_dict(text_keys, strict=True)
        newline = tensors.get("model.image_newline")
        model = types.SimpleNamespace(vision_tower=self.tower, mm_projector=self.projector, image_newline=newline,
                                      embed_tokens=self.lm.model.embed_tokens, get_vision_tower=lambda: self.tower)  # fmt: skip
        fake = types.SimpleNamespace(config=self.config, model=model, device="cpu", get_model=lambda: model,
                                     get_vision_tower=lambda: self.tower)  # fmt: skip
        fake.encode_images = lambda images: LlavaMetaForCausalLM.encode_images(fake, images)
        self._self = fake

    def logits(self, input_ids, images, image_sizes_wh=None, attention_mask=None) -> np.ndarray:
        """input_ids [B, T] with one IMAGE_TOKEN_INDEX (-200) per image; images as `process_images` gives
        them; image_sizes_wh as the original passes them, (width, height). Returns [B, T', V] float32 and
        the attention mask [B, T'] of the spliced sequence."""
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)).bool()
        with torch.no_grad():
            _, positions, mask, _, embeds, _ = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(
                self._self, ids, None, mask, None, None, images, image_sizes=image_sizes_wh
            )
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return out.logits.float().numpy(), (None if mask is None else mask.numpy())


def _under(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def collapse_image_tokens(ids: np.ndarray, image_token_id: int) -> list[list[int]]:
    """Our expanded input_ids -> the original's: each run of image tokens becomes one -200."""
    rows = []
    for row in np.atleast_2d(ids):
        out = []
        for i, token in enumerate(row.tolist()):
            if token != image_token_id:
                out.append(token)
            elif i == 0 or row[i - 1] != image_token_id:
                out.append(IMAGE_TOKEN_INDEX)
        rows.append(out)
    return rows
