"""``TrainSettings``: every setting of a training recipe, declared once (type, default, range, help).

Compression settings live in :class:`gift_quant.GiftConfig`; a recipe holds one of each. The seed is
the config's (one seed per run).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gift_quant.core.noise import NOISE_KINDS
from gift_quant.core.quantizer import SUPPORTED_BITS
from gift_quant.settings import setting, validate


@dataclass
class TrainSettings:
    train_dataset: str = setting("train", "training text: train (bundled topics + stdlib docstrings), a file or "
                                          "a chat .jsonl with 'messages' (loss on assistant tokens)",
                                 flag="--train-dataset")
    train_seq_len: int = setting(256, "tokens per training window", lo=1, flag="--train-seq-len")
    max_train_tokens: int = setting(None, "cap on the training text, in tokens (null: all)", lo=1,
                                    nullable=True)
    batch_size: int = setting(4, "windows per micro-batch", lo=1, flag="--batch-size")
    grad_accum: int = setting(1, "micro-batches per optimizer step", lo=1, flag="--grad-accum")
    steps: int = setting(60, "optimizer steps", lo=1, flag="--steps")
    lr: float = setting(1e-4, "AdamW learning rate", lo=0, lo_open=True, flag="--lr")
    warmup_ratio: float = setting(0.03, "share of the steps with a linear warmup", lo=0, hi=1, hi_open=True)
    weight_decay: float = setting(0.0, "AdamW weight decay", lo=0)
    schedule: str = setting("linear", "learning rate after warmup (transformers' get_scheduler)",
                            choices=("linear", "cosine", "constant"))
    max_grad_norm: float = setting(1.0, "gradient clipping norm (null: none)", lo=0, nullable=True)
    loss: str = setting("ce", "training objective: ce (next-token cross-entropy on the text) or kd (KL divergence "
                              "to the float model's next-token distribution on the same text; keeps a float copy "
                              "of the model while training)", choices=("ce", "kd"), flag="--loss")
    train_norms: bool = setting(False, "also train the decoder's normalization weights (about 1% more trainable "
                                       "parameters; saved in the same checkpoint)", flag="--train-norms")
    train_scales: bool = setting(False, "post: also train each quantization group's scale (a factor on the stored "
                                        "fp16 scale; the codes stay frozen, the checkpoint format is unchanged)",
                                 flag="--train-scales")
    scale_lr: float = setting(None, "AdamW learning rate of the scale factors (null: 10 x lr; at lr 1e-3 on 2 bits "
                                    "1x did nothing and 30x was worse than 10x)", lo=0,
                              lo_open=True, nullable=True, flag="--scale-lr")
    noise: str = setting(None, "quantization noise on the frozen columns during training (null: the method's "
                               "own: none for post, gaussian for pre)", nullable=True,
                         choices=NOISE_KINDS, flag="--noise")
    noise_bits: int = setting(None, "bits the noise imitates (null: the compression bits)",
                              choices=SUPPORTED_BITS, nullable=True)
    lora_rank: int = setting(None, "lora recipe: LoRA rank (null: GIFT's trainable-parameter count)",
                             lo=1, nullable=True)
    val_windows: int = setting(4, "held-out training windows for early stopping", lo=0)
    eval_every: int = setting(0, "held-out evaluation interval in steps (0: never)", lo=0)
    patience: int = setting(0, "evaluations without improvement before stopping (0: never)", lo=0)
    save_every: int = setting(10, "training checkpoint interval in steps (0: only at the end)", lo=0,
                              flag="--save-every")
    progress: bool = setting(True, "show a progress bar", runtime=True, recipe=False)

    def __post_init__(self):
        validate(self, "TrainSettings")

    def resume_fields(self) -> dict:
        """What a training checkpoint must agree on to be resumed (everything but cadence and display)."""
        return {k: v for k, v in asdict(self).items() if k not in ("save_every", "progress")}


@dataclass
class TrainReport:
    steps_done: int = 0
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)   # (step, loss)
    best_step: int | None = None
    best_val: float | None = None
    step_seconds: float = 0.0      # median wall time of one optimizer step
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0
    trainable_params: int = 0
    resumed_from: int | None = None
    stopped_early: bool = False

    def to_dict(self):
        d = asdict(self)
        d["losses"] = [round(x, 4) for x in self.losses]
        return d
