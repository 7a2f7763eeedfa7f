"""Configuration of the compress stage: every knob declared once, with its default and help text
(`llmprune.options`); `llmprune compress` builds its flags from these fields. Method-dependent
defaults come from the method registry (`compress/methods`)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from llmprune.artifact import PRECISIONS
from llmprune.errors import LLMPruneError
from llmprune.options import non_negative_int, option, positive_float, positive_int, vocab_size

from .methods import METHODS, PruningMethod, get_method, method_names

FIT_MODES = ("none", "scales", "refit")
SELECTIONS = ("energy", "pivot")
ALLOCATIONS = ("uniform", "error")

# Calibration size when none is given: `calib='self'` generates its text with the model itself,
# which is slow, so it defaults to less of it.
SELF_CALIB_DEFAULTS = {"calib_samples": 16, "calib_seq_len": 256}
DATA_CALIB_DEFAULTS = {"calib_samples": 32, "calib_seq_len": 512}
BUDGET_SCOPES = ("decoder", "total")


@dataclass
class CompressConfig:
    """What to remove and how (each field's help says what it means)."""

    ratio: float = option(0.2, help="fraction of parameters to remove, in (0, 1): of the whole model (--of total, "
                                    "the default) or of the decoder layers (--of decoder); 0 with --vocab prunes the "
                                    "vocabulary only")
    of: str | None = option(None, choices=BUDGET_SCOPES,
                            default_text="total; decoder with --low-memory or --ratio 0",
                            help="what --ratio is a fraction of: total (the whole model: the budget is split between "
                                 "vocabulary rows, whole layers and neurons, the vocabulary rows the data never uses "
                                 "going first; measured best at the same size) or decoder (the decoder layers' "
                                 "parameters only; embeddings and LM head untouched unless --vocab)")
    target_mb: float | None = option(None, parse=positive_float, metavar="MB",
                                     help="instead of --ratio: fit the exported artifact (every file the runtime "
                                          "needs) in MB megabytes (10^6 bytes) at --precision; the plan trades "
                                          "vocabulary rows against decoder cuts by their measured cost in bits per "
                                          "byte of held-out calibration text, and prints its predicted size")
    precision: str = option("int4", choices=PRECISIONS,
                            help="the export --target-mb plans for: int4 or int8 (`llmprune export --quantize "
                                 "int4|int8`) or fp32 (no --quantize)")
    vocab: int | float | None = option(None, parse=vocab_size, metavar="K|FRACTION",
                                       help="also prune the vocabulary: keep K token ids (a whole number), or the "
                                            "fewest covering FRACTION (0 < F <= 1, e.g. 0.999) of the tokens of "
                                            "--vocab-data; special, byte-fallback and building-block tokens are always kept")
    vocab_data: str | None = option(None, default_text="the calibration text",
                                    help="text whose token frequencies rank the vocabulary (file, folder or dataset)")
    method: str = option("comp", choices=method_names,
                         help="comp (block-influence layer removal + condition-aware neuron selection + "
                              "least-squares tuning) or a baseline: layer-only (ShortGPT), wanda-sp, magnitude, "
                              "fluctuation (FLAP), random, taylor (LLM-Pruner; needs gradients)")
    calib_samples: int | None = option(None, default_text="16 with --calib self, else 32",
                                       help="calibration windows N")
    calib_seq_len: int | None = option(None, default_text="256 with --calib self, else 512",
                                       help="tokens per calibration window L")
    layer_share: float | str | None = option(None, default_text="auto for comp, 1 for layer-only, 0 for the other "
                                                               "baselines",
                                             help="'auto' (try every whole-layer count that fits the budget, keep "
                                                  "the lowest calibration loss) or the fraction of the budget taken "
                                                  "as whole layers")
    split_patience: int = option(2, parse=non_negative_int, metavar="N",
                                 help="--layer-share auto: stop adding whole layers after N candidates in a row "
                                      "that do not lower the best calibration loss (0: try every count)")
    fit: str = option("refit", choices=FIT_MODES,
                      help="comp's least-squares tuning of each pruned output projection: refit (the whole kept "
                           "projection; measures best), scales (one multiplier per kept neuron: mask tuning), none")
    selection: str = option("energy", choices=SELECTIONS,
                            help="comp's neuron order: energy (output energy ‖x_j‖·‖W_j‖; measures best) or pivot "
                                 "(greedy pivoted Cholesky on the weighted Gram: large and well conditioned)")
    prune_heads: bool = option(False, help="also prune attention query heads, evenly within each KV group (where a "
                                           "KV head serves more than one query head)")
    head_ratio: float | None = option(None, default_text="--ratio", help="fraction of query heads removed per layer")
    allocation: str | None = option(None, choices=ALLOCATIONS, default_text="error for comp, else uniform",
                                    help="neurons per layer: error (minimise the summed refit error of the layers, "
                                         "from their error curves) or uniform (the same fraction everywhere)")
    uniform: bool = option(False, help="every kept layer keeps the same MLP width, a multiple of --uniform-multiple "
                                       "(as Minitron prunes): what llama.cpp's Gemma-3 / Qwen graphs (one width for all "
                                       "layers) and its K-quants (rows in blocks of 256) run fastest; the width is "
                                       "rounded down, so at least --ratio is removed")
    uniform_multiple: int = option(256, parse=positive_int, metavar="N",
                                   help="--uniform: the kept MLP width is a multiple of N")
    low_memory: bool = option(False, help="load one decoder layer at a time from safetensors (needs a local "
                                          "safetensors folder and a --calib file)")
    seed: int = option(0, help="seed")
    ridge: float = option(1e-2, cli=False, help="ridge of the least-squares tuning, relative to the Gram's diagonal")
    intercept: bool = option(False, help="comp: also fit an output bias (the mean of what was removed); FLAP always does")
    min_keep: float = option(0.25, cli=False, help="error allocation: the least fraction of neurons a layer keeps")
    loss_windows: int = option(4, cli=False, help="held-out windows the calibration loss is measured on")
    batch_size: int = option(4, cli=False, help="calibration windows per forward call")

    def __post_init__(self) -> None:
        self._resolve_scope()
        self._check_budget()
        self._check_target()
        self._check_choices()
        self._parse_layer_share()
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise LLMPruneError(f"--head-ratio must be in [0, 1) (got {self.head_ratio})", "pass e.g. --head-ratio 0.25")
        for name in ("calib_samples", "calib_seq_len", "loss_windows", "batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise LLMPruneError(f"--{name.replace('_', '-')} must be at least 1", "pass a positive number")
        if self.low_memory and not self.pruning_method.low_memory:
            raise LLMPruneError(f"--method {self.method} has no --low-memory path (it needs the whole model in memory)",
                                f"drop --low-memory, or choose one of: {', '.join(low_memory_methods())}")

    def _resolve_scope(self) -> None:
        """--of unset: the whole model, except where only the decoder can be counted (--low-memory
        loads one decoder layer at a time; --ratio 0 --vocab prunes the vocabulary alone)."""
        if self.of is None:
            self.of = "decoder" if self.low_memory or self.ratio == 0 else "total"

    def _check_budget(self) -> None:
        vocab_only = self.vocab is not None and self.of == "decoder" and self.ratio == 0
        if self.vocab is not None and self.of == "total" and self.ratio == 0:
            raise LLMPruneError("--ratio 0 --of total asks the whole model to lose nothing",
                                "drop --of total to prune the vocabulary only (--ratio 0 --vocab K), or give --ratio above 0")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0.0 < float(self.ratio) < 1.0 or vocab_only):
            raise LLMPruneError(f"--ratio must be between 0 and 1, exclusive (got {self.ratio}; 0 only with --vocab)",
                                "pass e.g. --ratio 0.2")
        if vocab_only:
            self._check_no_decoder_flags()
        if self.of not in BUDGET_SCOPES:
            raise LLMPruneError(f"unknown --of '{self.of}'", f"choose one of: {', '.join(BUDGET_SCOPES)}")
        if self.vocab is not None and (isinstance(self.vocab, bool) or not isinstance(self.vocab, (int, float))):
            raise LLMPruneError(f"--vocab must be a token count or a fraction in (0, 1] (got {self.vocab!r})",
                                "pass e.g. --vocab 32000 or --vocab 0.999")
        if isinstance(self.vocab, int) and self.vocab < 1 or isinstance(self.vocab, float) and not 0 < self.vocab <= 1:
            raise LLMPruneError(f"--vocab {self.vocab} is neither a token count (1 or more) nor a fraction in (0, 1]",
                                "pass e.g. --vocab 32000 or --vocab 0.999")
        if self.low_memory and (self.vocab is not None or self.of == "total"):
            raise LLMPruneError("--vocab and --of total have no --low-memory path", "drop --low-memory")
        if self.vocab_data is not None and self.vocab is None and self.of == "decoder":
            raise LLMPruneError("--vocab-data ranks the vocabulary, but no --vocab was given",
                                "pass --vocab K or --vocab FRACTION, or drop --vocab-data")

    def _check_no_decoder_flags(self) -> None:
        """--ratio 0 prunes the vocabulary only: a decoder setting would be silently ignored."""
        given = [flag for flag, changed in (
            ("--method", self.method != "comp"), ("--prune-heads", self.prune_heads),
            ("--head-ratio", self.head_ratio is not None), ("--layer-share", self.layer_share is not None),
            ("--allocation", self.allocation is not None), ("--fit", self.fit != "refit"),
            ("--selection", self.selection != "energy"), ("--intercept", self.intercept)) if changed]
        if given:
            raise LLMPruneError(f"{given[0]} prunes the decoder, but --ratio 0 prunes the vocabulary only",
                                f"drop {given[0]}, or give a --ratio above 0")

    def _check_target(self) -> None:
        """--target-mb chooses the vocabulary and the decoder ratio itself."""
        if self.precision not in PRECISIONS:
            raise LLMPruneError(f"unknown --precision '{self.precision}'", f"choose one of: {', '.join(PRECISIONS)}")
        if self.target_mb is None:
            if self.precision != "int4":
                raise LLMPruneError("--precision sets the export --target-mb plans for, but no --target-mb was given",
                                    "add --target-mb MB, or drop --precision")
            return
        if isinstance(self.target_mb, bool) or not isinstance(self.target_mb, (int, float)) or not (
                0 < self.target_mb < float("inf")):
            raise LLMPruneError(f"--target-mb must be a positive number of megabytes (got {self.target_mb!r})",
                                "pass e.g. --target-mb 100")
        for flag, given in (("--vocab", self.vocab is not None), ("--low-memory", self.low_memory)):
            if given:
                raise LLMPruneError(f"{flag} cannot be combined with --target-mb (the plan chooses the vocabulary "
                                    "and the decoder cut in memory)", f"drop {flag}, or use --ratio instead of --target-mb")

    @property
    def prunes_vocabulary(self) -> bool:
        return self.vocab is not None or self.of == "total" or self.target_mb is not None

    def _check_choices(self) -> None:
        get_method(self.method)  # raises the one-line error naming the choices
        if self.uniform and self.allocation == "error":
            raise LLMPruneError("--uniform keeps one MLP width for every layer; --allocation error gives each its own",
                                "drop one of --uniform and --allocation error")
        for flag, value, choices in (("selection", self.selection, SELECTIONS), ("fit", self.fit, FIT_MODES),
                                     ("allocation", self.allocation, ALLOCATIONS)):
            if value is not None and value not in choices:
                raise LLMPruneError(f"unknown {flag} '{value}'", f"choose one of: {', '.join(choices)}")

    def _parse_layer_share(self) -> None:
        share = self.layer_share
        if isinstance(share, str) and share != "auto":
            try:
                share = float(share)
            except ValueError:
                raise LLMPruneError(f"--layer-share must be 'auto' or a number in [0, 1] (got {share!r})",
                                    "pass --layer-share auto or e.g. 0.5") from None
            self.layer_share = share
        if isinstance(share, (int, float)) and not 0.0 <= float(share) <= 1.0:
            raise LLMPruneError(f"--layer-share must be in [0, 1] (got {share})", "pass --layer-share auto or e.g. 0.5")

    def with_calibration_defaults(self, calib) -> "CompressConfig":
        """The calibration size filled in for this calibration source: 16×256 for 'self' (text the
        model generates), 32×512 for data; sizes given explicitly are kept."""
        defaults = SELF_CALIB_DEFAULTS if isinstance(calib, str) and calib == "self" else DATA_CALIB_DEFAULTS
        return dataclasses.replace(self, **{k: v if getattr(self, k) is None else getattr(self, k)
                                            for k, v in defaults.items()})

    @property
    def pruning_method(self) -> PruningMethod:
        return get_method(self.method)

    @property
    def effective_layer_share(self) -> float | str:
        return self.layer_share if self.layer_share is not None else self.pruning_method.layer_share

    @property
    def fit_mode(self) -> str:
        """Least-squares tuning of the output projections, for the methods that tune."""
        return self.fit if self.pruning_method.tunes else "none"

    @property
    def effective_allocation(self) -> str:
        if self.uniform:
            return "uniform"
        return self.allocation if self.allocation is not None else self.pruning_method.allocation

    @property
    def uses_intercept(self) -> bool:
        """comp fits an output bias when asked; FLAP always restores the removed mean."""
        rule = self.pruning_method.intercept
        return rule == "always" or (rule == "option" and self.intercept)

    @property
    def head_prune_ratio(self) -> float | None:
        """Fraction of query heads removed per layer (None: heads are not pruned)."""
        if not self.prune_heads:
            return None
        return self.head_ratio if self.head_ratio is not None else self.ratio

    def to_dict(self) -> dict:
        return asdict(self)


def low_memory_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.low_memory]
