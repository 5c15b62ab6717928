"""The recipe methods, as a registry: each has ``prepare`` (compress and/or wrap the modules that train),
``train`` and ``finalize`` (unwrap, compress what is left), and ``save``.

Adding a method is one class with ``@register_method("name")``; the runner never branches on names.
"""
from __future__ import annotations

import warnings

import torch

from gift_quant.compress.selection import select_fp
from gift_quant.errors import GiftError
from gift_quant.eval.perplexity import perplexity
from gift_quant.io.export import STORAGE_DTYPE, round_to_storage, save_checkpoint
from gift_quant.nn import GiftLinear, MixedPrecisionLinear
from gift_quant.nn.swap import swap_modules
from gift_quant.train.loop import train
from gift_quant.train.stage import compress_stage

METHODS: dict[str, "Method"] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls()
        return cls
    return deco


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze_norms(model) -> int:
    """Make the normalization weights trainable (norm tweaking): elementwise, so their gradient is free once
    the activations' gradient is computed. Returns how many tensors."""
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") or isinstance(m, torch.nn.LayerNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
                n += 1
    if not n:
        warnings.warn("gift-quant: train_norms found no normalization layer to train", stacklevel=2)
    return n


class Method:
    """Base: compress, no training. ``run`` is the :class:`~gift_quant.train.runner.Run` of one recipe."""

    name = "?"
    trains = True
    trains_scales = False  # post alone has group scales to train (pre's come from GPTQ after training)
    default_noise = "none"  # what a recipe that names the method but no noise trains with

    def check(self, recipe):
        """Refuse, before any long work, a combination of settings this method cannot use."""
        if self.trains and recipe.train.train_scales and not self.trains_scales:  # none ignores training flags
            raise GiftError(f"train_scales needs recipe post (recipe {self.name} has no frozen codes with scales "
                            "to train)")

    def prepare(self, run):
        self.compress(run)

    def train(self, run):
        ids, labels, val, val_labels = run.train_data
        run.train_report = train(run.model, ids, run.recipe.train, run.work_dir, run.resume, labels, val,
                                 val_labels, run.fingerprint, run.device, run.log, seed=run.config.seed,
                                 teacher=run.teacher)
        run.teacher = None  # free the float copy before finalize

    def finalize(self, run):
        pass

    def save(self, run, out_dir):
        save_checkpoint(run.model.to(STORAGE_DTYPE), run.tokenizer, out_dir, run.compress_report, run.summary)
        run.model.float()

    # ---- shared steps
    def compress(self, run, salient=None, cache: bool = True):
        run.config, run.compress_report, bpw, info = compress_stage(
            run.config, run.model, run.samples, run.work_dir if cache else None, run.resume and cache, run.device,
            run.progress, salient)
        run.bits_per_weight = bpw
        run.compress_seconds = info["compress_seconds"]  # of the run that compressed, when resumed
        run.stage_summary = info["summary"]
        round_to_storage(run.model)  # train and evaluate exactly what the checkpoint stores
        if run.eval_before_training and run.eval_windows is not None and self.trains:
            run.summary["perplexity_before_training"] = round(
                perplexity(run.model, run.eval_windows, progress=run.progress), 3)


@register_method("none")
class NoTraining(Method):
    """GPTQ (or RTN) + FP16 salient columns, no training: the baseline of every other method."""

    trains = False

    def train(self, run):
        pass


@register_method("post")
class Post(Method):
    """GIFT-SW post: compress, then train the FP16 columns on the frozen codes (no noise by default, as the
    method's public code; opt-in noise has sigma = half each group's stored scale), write them back."""

    trains_scales = True

    def prepare(self, run):
        self.compress(run)
        run.model.to(run.device)
        s = run.recipe.train
        swap_modules(run.model, lambda n, m: GiftLinear.from_mixed(m, s.noise, s.noise_bits, s.train_scales)
                     .to(run.device), (MixedPrecisionLinear,))

    def finalize(self, run):
        swap_modules(run.model, lambda n, m: m.to_mixed(), (GiftLinear,))
        run.model.to("cpu")


@register_method("pre")
class Pre(Method):
    """GIFT-SW pre: select on the float model, train those columns with noise on the float base, then
    compress with the trained columns kept FP16 (they receive GPTQ's error compensation)."""

    default_noise = "gaussian"  # the method as published; at 2-3 bits it measured worse (the warning below)

    def check(self, recipe):
        super().check(recipe)
        if recipe.train.loss == "kd" and recipe.train.noise == "none":
            raise GiftError("loss kd with recipe pre and noise none has nothing to learn: before GPTQ the model "
                            "equals its float teacher; use recipe post, or noise")

    def prepare(self, run):
        from gift_quant.compress.layers import decoder_layers
        run.model.to(run.device)
        self.salient = select_fp(run.model, run.samples.to(run.device), run.config)
        layers, prefix = decoder_layers(run.model)
        s, bits = run.recipe.train, run.config.bits
        if s.noise != "none" and (s.noise_bits or bits) <= 3:
            warnings.warn(f"gift-quant: pre with {s.noise} noise at {s.noise_bits or bits} bits measured worse than "
                          "without noise (2 bits: 721 vs 109 idle ppl; 3 bits: 49 vs 40; BENCHMARKS.md); "
                          "--noise none or --recipe post do better", stacklevel=2)
        cfg = run.config  # the noise imitates the quantizer that will run: its bits, groups, sym and clip search
        swap_modules(layers, lambda n, m: GiftLinear.from_linear(m, self.salient[f"{prefix}.{n}"], bits, s.noise,
                                                                 s.noise_bits, cfg.group_size, cfg.sym,
                                                                 cfg.mse_clip).to(run.device),
                     (torch.nn.Linear,), where=lambda n: f"{prefix}.{n}" in self.salient)

    def finalize(self, run):
        swap_modules(run.model, lambda n, m: m.to_linear(), (GiftLinear,))
        freeze(run.model).to("cpu")
        self.compress(run, salient=self.salient, cache=False)


@register_method("ste")
class Ste(Method):
    """QAT baseline: straight-through rounding of the whole base on the same data, steps and seeds."""

    def prepare(self, run):
        from gift_quant.train.baselines import SteLinear
        self.compress(run)
        run.model.to(run.device)
        swap_modules(run.model, lambda n, m: SteLinear(m).to(run.device), (MixedPrecisionLinear,))

    def finalize(self, run):
        from gift_quant.train.baselines import SteLinear
        swap_modules(run.model, lambda n, m: m.to_mixed(), (SteLinear,))
        freeze(run.model).to("cpu")


@register_method("lora")
class Lora(Method):
    """Baseline: peft LoRA on the compressed model at GIFT's trainable-parameter count."""

    def prepare(self, run):

        from peft import get_peft_model

        from gift_quant.train.baselines import lora_config
        self.compress(run)
        cfg = lora_config(run.model, run.recipe.train.lora_rank)
        torch.manual_seed(run.config.seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Unsupported layer type.*")
            run.model = get_peft_model(run.model, cfg)
        run.model.to(run.device)

    def finalize(self, run):
        freeze(run.model).to("cpu")

    def save(self, run, out_dir):
        from gift_quant.train.baselines import save_lora
        save_lora(run.model, run.tokenizer, out_dir, run.compress_report, run.summary)
