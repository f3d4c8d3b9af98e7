"""The config schema: one dataclass per pipeline stage, the enums of its string modes, and
:class:`ConfigError`. Values and their loading order are :mod:`hfedit.config`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


from hfedit.device import Precision


class ConfigError(ValueError):
    """A configuration value that does not fit the schema; the message names the key."""


# --------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """``prepare`` stage: image folder (or the bundled images) -> uint8 Parquet shards."""

    # "bundled" = real images shipped inside installed packages (scikit-image, matplotlib);
    # otherwise a folder, searched recursively.
    source: str = "bundled"
    resolution: int = 32
    val_fraction: float = 0.2
    # Share of the images that train only the rectifier (pretraining and edits), never the
    # backbone: the paper's setting (hfedit.data.manifest.split_roles). 0 = the rectifier trains on the
    # backbone's images. The default profile (params.yaml) sets 0.3.
    rectifier_fraction: float = 0.0
    seed: int = 0
    # Images with more pixels than this are refused before decoding (decompression bombs).
    max_pixels: int = 40_000_000
    # Refuse files whose format can hide damage (WebP, TIFF, BMP, ...: integrity "unverified" in
    # the manifests, hfedit.data.images.INTEGRITY); false accepts and labels them.
    require_verified: bool = False
    # Crop to a centred square before resizing (no aspect distortion).
    center_crop: bool = True
    # Use only the first N inputs in sorted order (0 = all): a quick run on a subset.
    max_images: int = 0
    # Images per Parquet shard of the prepared dataset (uint8: 192 KiB each at 256 px).
    shard_images: int = 1000
    # Decode processes of prepare (0 = one per CPU).
    workers: int = 0


# ----------------------------------------------------------------------------------- backbone
@dataclass
class UNetConfig:
    """Architecture of the backbone the ``tiny`` profile trains (a diffusers UNet2DModel)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "DownBlock2D", "DownBlock2D"]
    )
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "UpBlock2D", "UpBlock2D"]
    )
    layers_per_block: int = 1
    norm_num_groups: int = 8


class BetaSchedule(str, Enum):
    linear = "linear"
    scaled_linear = "scaled_linear"
    squaredcos_cap_v2 = "squaredcos_cap_v2"


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = BetaSchedule.linear


@dataclass
class BackboneTrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    hflip: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    sample_steps: int = 100
    num_samples: int = 16


@dataclass
class BackboneConfig:
    """``backbone`` stage.

    ``source``: "train" trains the tiny DDPM on the prepared images; anything else is a diffusers
    hub id (``google/ddpm-ema-celebahq-256``) or a local folder holding a saved UNet2DModel and
    its scheduler.
    """

    source: str = "train"
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: BackboneTrainConfig = field(default_factory=BackboneTrainConfig)


# ---------------------------------------------------------------------------------- inversion
class Conditioning(str, Enum):
    """Which x0 estimate ``P_t`` conditions the rectifier during an edit's replay
    (``hfedit/editing/editor.py``).

    ``trajectory``: the backbone's estimate on the inversion's own ``x_t`` (kept from the
    inversion: no extra evaluation). These are the ``x_t ~ q(x_t | x0)`` that Algorithm 1 trains
    on, and all offsets are known before the replay: one batched hypernetwork call per attribute
    (per window of steps past 512 (step, image) pairs), then one modulated U-Net pass per step.
    ``live``: the backbone's estimate on the edited trajectory's current ``x_t`` (a plain pass,
    the hypernetwork and a modulated pass per step).
    """

    trajectory = "trajectory"
    live = "live"


class EditMode(str, Enum):
    """How an image is inverted and re-sampled for an edit (``hfedit/editing/editor.py``).

    ``edit_friendly``: edit-friendly DDPM inversion (ALGORITHMS.md section 1), then the DDPM
    replay of its noise maps through the rectified model; with no rectifier the input comes back
    exactly. ``ddim``: deterministic DDIM inversion with the backbone (section 2), then DDIM
    sampling (eta = 0) from ``x_T`` through the rectified model conditioned on the source: the
    protocol of DiffusionCLIP and Asyrp and, most likely, of the paper's own edits; with no
    rectifier the result is the backbone's DDIM reconstruction (not exact).
    """

    edit_friendly = "edit_friendly"
    ddim = "ddim"


@dataclass
class InversionConfig:
    """Inversion and re-sampling of every edit: ``mode`` (edit-friendly replay or DDIM),
    ``num_steps`` N, ``eta`` of the edit-friendly maps (DDIM is eta = 0), ``skip`` steps
    skipped, the rectifier conditioned as ``condition`` says."""

    num_steps: int = 50
    eta: float = 1.0
    skip: int = 0
    seed: int = 0
    condition: Conditioning = Conditioning.trajectory
    mode: EditMode = EditMode.edit_friendly


# ---------------------------------------------------------------------------------- rectifier
class RectifierTrunk(str, Enum):
    """torchvision ResNet trunk of the rectifier's global encoder (ALGORITHMS.md section 3)."""

    resnet18 = "resnet18"
    resnet34 = "resnet34"


class ModulationMode(str, Enum):
    """How a conv runs with per-sample kernels ``theta * (1 + Delta_b)``
    (:mod:`hfedit.models.modulation`).

    All are exact (they differ by float rounding only). ``auto`` is ``grouped`` on every device
    and batch size (:func:`hfedit.models.modulation.resolve_mode`); ``lowrank`` builds no
    per-sample kernels, for when those do not fit in memory; ``loop`` is the reference.
    """

    auto = "auto"
    grouped = "grouped"
    loop = "loop"
    lowrank = "lowrank"


@dataclass
class RectifierConfig:
    """The rectifier hypernetwork (paper 2312.15707, "Hypernetwork as Rectifier", appendix A).

    ``targets`` names a pattern set in ``targets_file`` (include/exclude regexes over the U-Net's
    ``named_modules()`` names); a relative ``targets_file`` is resolved against the project root,
    then against the source checkout.
    """

    trunk: RectifierTrunk = RectifierTrunk.resnet34
    # channels of every subnet branch (one branch per modulated conv)
    branch_channels: int = 64
    # width of the sinusoidal time embedding and of its MLP
    time_embed_dim: int = 128
    modulation: ModulationMode = ModulationMode.auto
    targets: str = "diffusers_unet2d"
    targets_file: str = "conf/rectifier_targets.yaml"


class ReconLossKind(str, Enum):
    """Reconstruction loss of the rectifier (paper appendix C): noise fitting wins there."""

    noise = "noise"
    l1 = "l1"
    l1_dw = "l1_dw"


@dataclass
class Augmentation:
    """Augmentation of rectifier pretraining batches (:func:`hfedit.training.augment.augment`), each image
    its own draw: ``hflip`` probability of a horizontal flip; ``max_shift`` largest circular
    shift in pixels (each axis); ``brightness`` / ``contrast`` / ``saturation`` largest relative
    change (uniform in [1 - v, 1 + v]). All 0: off (the batches as stored)."""

    hflip: float = 0.5
    max_shift: int = 2
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    @property
    def off(self) -> bool:
        return not (self.hflip or self.max_shift or self.brightness or self.contrast
                    or self.saturation)


@dataclass
class PretrainConfig:
    """``pretrain_rectifier`` stage: reconstruction training (paper eq. 3) on Ray Train."""

    steps: int = 200
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_decay_every: int = 5000
    lr_decay: float = 0.9
    loss: ReconLossKind = ReconLossKind.noise
    dw_weight: float = 0.1  # weight of the delta-weight penalty of loss l1_dw
    # flips, shifts and colour jitter of every batch: the rectifier sees more than its images
    augment: Augmentation = field(default_factory=Augmentation)
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    # held-out reconstruction report: inversion + sampling steps, images
    eval_steps: int = 50
    eval_images: int = 16
    eval_gap_timesteps: int = 20  # evenly spaced timesteps of the noise gap's average


# --------------------------------------------------------------------------------------- clip
@dataclass
class ClipConfig:
    """CLIP for the directional loss (ALGORITHMS.md section 4); see ``hfedit.models.clip``.

    ``weights``: an open_clip pretrained tag for ``model`` ("openai", "laion2b_s34b_b79k"; needs
    the network or a filled HF cache), or a local ``.safetensors``/``.bin``/``.pt`` state dict
    (loaded without unpickling code), or "" for seeded random weights: edits are then not
    semantic, and the run says so (allowed only when ``allow_random``).
    """

    model: str = "ViT-B-32"
    weights: str = ""
    seed: int = 0
    allow_random: bool = True


# -------------------------------------------------------------------------------------- edits
class EditMethod(str, Enum):
    """How an attribute's edit rectifier is trained (ALGORITHMS.md section 4)."""

    # the paper's Algorithm 1: every step from the original trajectory x_t ~ q(x_t | x0)
    score_matching = "score_matching"
    # DiffusionCLIP-style baseline: DDIM-invert to t0, run the modulated chain to 0 with gradients
    markovian = "markovian"


class LargeT(str, Enum):
    """What Algorithm 1 does about large t, where ``x0_edit = P_t[eps~]`` divides the
    rectifier's noise error by ``sqrt(abar_t)`` (1/sqrt(abar_999) ~ 157 for the linear
    schedule), so CLIP sees images far outside [-1, 1] and the largest t dominate the gradient
    (``benchmarks/edit_large_t.py`` measures it).

    ``none``: the paper's objective as written. ``clamp``: CLIP sees ``x0_edit`` clamped to
    [-1, 1] (the L1 term still sees it unclamped). ``weight``: each image's loss weighted by
    ``sqrt(abar_t)``, which cancels the 1/sqrt(abar_t) of P_t. ``range``: ``t ~ U{0..t_max-1}``.
    """

    none = "none"
    clamp = "clamp"
    weight = "weight"
    range = "range"


@dataclass
class AttributeConfig:
    """One attribute of stage ``train_edits``: texts, loss weights and optimisation (paper eq. 6,
    Algorithm 1). Adam without weight decay, lr x``decay`` every ``decay_every`` steps;
    ``num_images`` training images (all of the training split when it has fewer)."""

    source: str = "a face"
    target: str = ""
    lambda_clip: float = 1.0
    lambda_recon: float = 1.0
    lr: float = 1e-3
    decay_every: int = 10
    decay: float = 0.9
    steps: int = 40  # optimisation steps; 0 in params.yaml = the profile's edits.steps
    num_images: int = 100
    batch_size: int = 4
    method: EditMethod = EditMethod.score_matching
    seed: int = 0
    # Algorithm 1 at large t (LargeT): none (the paper as written) | clamp | weight | range
    large_t: LargeT = LargeT.clamp
    t_max: int = 1000  # large_t=range: t ~ U{0..t_max-1}


@dataclass
class MarkovianConfig:
    """The Markovian baseline (DiffusionCLIP): DDIM-invert x0 with the backbone to ``t0`` in
    ``inversion_steps`` steps (once per image), then run the modulated DDIM chain ``t0 -> 0`` in
    ``train_steps`` steps with gradients through all of them (DiffusionCLIP's n_train_step)."""

    t0: int = 500
    inversion_steps: int = 10
    train_steps: int = 4


@dataclass
class EditAblationConfig:
    """Stage ``edit_ablation`` (the paper's Fig. 6): train ``attribute`` with both methods at an
    equal budget (``steps``; 0 = the attribute's own) and evaluate both on ``eval_images``
    held-out images, edited with ``inversion`` settings. Identity similarity needs faces of at
    least ``min_face_px`` pixels."""

    enabled: bool = True
    attribute: str = "smiling"
    steps: int = 0
    eval_images: int = 8
    min_face_px: int = 40


@dataclass
class EditsConfig:
    """Stages ``train_edits`` (one Ray task per entry of ``attributes``) and ``edit_ablation``."""

    attributes: dict[str, AttributeConfig] = field(default_factory=dict)
    steps: int = 40  # an attribute's optimisation steps when its own ``steps`` is 0 (profiles set it)
    markovian: MarkovianConfig = field(default_factory=MarkovianConfig)
    ablation: EditAblationConfig = field(default_factory=EditAblationConfig)
    log_every: int = 5
    # true: edit rectifiers keep the reconstruction rectifier's trunk (ResNet + time MLP) frozen
    # and store only their per-target branches and heads, with a reference to it (a smaller
    # file). Off by default: the paper trains the whole rectifier per attribute, and a frozen
    # trunk gives other edits.
    share_trunk: bool = False


# --------------------------------------------------------------------------------- edit_batch
@dataclass
class EditBatchConfig:
    """Stage ``edit_batch`` (Ray Data, ``pipelines/edit_batch.py``): invert every input image once
    and replay it per attribute.

    ``attributes``: ``reconstruction`` (the backbone alone: the input back) and/or names with an
    edit rectifier in ``edits_dir/<name>/``. Image ``id``'s noise is seeded by
    sha256(f"{inversion.seed}:{id}"); a batch of images is inverted once and replayed for every
    attribute in one batch, so ``batch_size`` changes the outputs by float rounding only (within
    1e-5 before quantisation) and the other settings not at all. They set speed: ``actors`` Ray
    Data actors (each loads the backbone and the rectifiers once), ``batch_size`` images per
    call (and per inversion and joint replay), ``num_cpus`` /
    ``num_gpus`` and ``torch_threads`` per actor. Keep ``actors * num_cpus`` at most the
    cluster's CPUs.
    """

    attributes: list[str] = field(default_factory=lambda: ["reconstruction"])
    edits_dir: str = "models/edits"
    actors: int = 2
    batch_size: int = 4
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    torch_threads: int = 1
    # Ray Data restarts a dead actor and retries its batch; an image on which workers died this
    # many times is reported as worker_crashed instead of being retried forever.
    max_attempts: int = 2


# ------------------------------------------------------------------------------------ runtime
@dataclass
class MlflowConfig:
    # Empty = a local SQLite store in the project root; MLFLOW_TRACKING_URI overrides both.
    tracking_uri: str = ""
    experiment: str = "hfedit"
    # Register the reconstruction rectifier and every edit rectifier in the model registry as
    # <registry_prefix>-rectifier and <registry_prefix>-edit-<attribute>.
    register: bool = True
    registry_prefix: str = "hfedit"
    # Point the alias champion (what serving uses) at the versions this run registers; off: only
    # a model's first version becomes champion, the rest get latest (and exp-<name> in trials).
    promote: bool = False


@dataclass
class RayConfig:
    # "" = start a local Ray (or join RAY_ADDRESS when set); "auto" = the running cluster
    address: str = ""
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    torch_threads_per_worker: int = 1
    # one Ray task per attribute in train_edits / per method in edit_ablation
    edit_task_cpus: float = 1.0
    # GPUs per task when runtime.device puts them on GPUs (auto on a cluster with GPUs, or
    # cuda); fractions share a GPU between tasks. Ray Train workers take one GPU each.
    edit_task_gpus: float = 1.0


@dataclass
class RuntimeConfig:
    """Where and how things run; changes speed and memory, never which computation is done.

    ``device``: auto | cpu | cuda | cuda:<i>, honoured by every stage, the CLI, Ray Train
    workers (NCCL on GPUs, gloo on CPUs), Ray tasks and Ray Data actors (hfedit.device).
    ``precision``: fp32 | bf16 | fp16 autocast of the network passes (maps, losses and metrics
    stay float32); which is allowed for which work: hfedit.device.ALLOWED.
    ``activation_checkpointing``: recompute the modulated U-Net's blocks in the backward pass of
    rectifier training (less memory, ~1 more forward); results are identical.
    ``eval_batch_size``: images per batch of every evaluation (pretraining report, evaluate,
    ablation).
    """

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # torch threads per process; 0 = torch's default
    torch_threads: int = 0
    device: str = "auto"
    precision: Precision = Precision.fp32
    activation_checkpointing: bool = False
    eval_batch_size: int = 8


# ------------------------------------------------------------------------------------- whole
@dataclass
class EvaluateConfig:
    """Stage ``evaluate``: the paper's comparisons on held-out (val) images."""

    # Inversion + sampling step counts of every comparison (reconstruction and editing).
    steps: list[int] = field(default_factory=lambda: [10, 50, 100])
    images: int = 8  # the first N val images
    gap_timesteps: int = 20  # evenly spaced timesteps of the noise gap's average
    # The paper's Fig. 7: SDEdit (noise to strength * T, sample down) with and without the
    # reconstruction rectifier, same noise, at the headline N; [] = not run.
    sdedit_strengths: list[float] = field(default_factory=lambda: [0.3, 0.5])
    # Side-by-side edit comparisons, each one more edit per attribute, image and N: "conditioning"
    # (inversion.condition trajectory vs live) and "modes" (inversion.mode edit_friendly vs
    # ddim); [] = the edits of the configured mode and conditioning only (a third of the time).
    side_by_side: list[str] = field(default_factory=lambda: list(SIDE_BY_SIDE))
    # LPIPS is added when its weights are on disk (hfedit.evaluation.metrics.lpips_available), else the
    # report says why it is missing; it never downloads.


SIDE_BY_SIDE = ("conditioning", "modes")  # evaluate.side_by_side's names


@dataclass
class HfeditConfig:
    profile: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    rectifier: RectifierConfig = field(default_factory=RectifierConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    edits: EditsConfig = field(default_factory=EditsConfig)
    edit_batch: EditBatchConfig = field(default_factory=EditBatchConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
