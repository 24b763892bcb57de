"""Defaults shared by every experiment config; each file in configs/ starts from `base_config()`.

Every field is documented here once. Experiment configs override what they need and add a
`smoke` variant that runs in seconds on a CPU.

Splits. Without a variant token every MRI/PET/CT config trains on whole volumes of the `train`
split and evaluates whole volumes of the `test` split: right for a datalist whose test subjects
are other people. The token `heldout` restores the region split of the stores this repository
builds (tools/prepare_data.py, the demo's phantom), whose test subjects are the training subject
or share its anatomy (jaxvol.data.tasks, `apply_split`); `whole` names the default explicitly and
is kept so that older commands still run.

Whole-volume training. The PPDM configs take the token `fullvolume` (`FULLVOLUME`,
`apply_fullvolume`): every training example is a subject's WHOLE training region (the whole volume,
or under `heldout` the whole training region of the split) edge-padded to the method's spatial
multiple, instead of a random crop (config.data.crops = "whole"), and sampling runs in one pass.
It says nothing about which subjects or regions are used (that is `heldout` / `whole`).
"""

from typing import Iterable, Sequence

import ml_collections
from ml_collections import config_dict

from jaxvol import methods
from jaxvol.data import tasks as tasks_lib


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "ppdm"            # ppdm | full3d | wdm | regression | sparse | prdit
  c.compute_dtype = "auto"     # auto: bfloat16 on GPU/TPU, float32 on CPU; or float32 / bfloat16
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.store = ""                 # preconverted store (tools/convert.py); required
  d.inputs = ("cond",)         # modalities stacked as the condition's channels (first = bridge end)
  d.target = "target"          # modality to predict
  d.crop_size = (32, 32, 32)   # training patch, a multiple of the method's spatial multiple
  d.batch_size = 2             # global batch, divisible by the data-parallel device count
  d.num_workers = 0            # Grain worker processes
  d.flips = True               # random flips along each axis
  # Where training crops lie: "random" (a uniform random corner per sample) or "grid" (the
  # sparse-diffusion authors' loader: every patch of a fixed grid with 50% overlap over the volume,
  # or its region, the last start moved back to end at the volume's edge, shuffled each epoch;
  # an axis shorter than the crop is read from its start and padded at the end with -1).
  d.crops = "random"
  # Append 3 condition channels holding each voxel's normalised position in the whole volume
  # (voxel centres mapped to [-1, 1] per axis): a patch-trained network then knows where its patch
  # lies (patch-based priors, jaxvol.inverse).
  d.position_channels = False
  # The axes (0, 1, 2: RAS x, y, z) whose position channel holds coordinates; the others are 0, a
  # constant the first convolution ignores. Encode only axes whose evaluation region lies inside
  # the training region (jaxvol.data.pipeline.check_position_coverage refuses the others).
  d.position_axes = (0, 1, 2)
  # Region splits of one volume: {"axis": (lo_frac, hi_frac)}, e.g. {"0": (0.0, 0.5)} trains on
  # the first half of the RAS x axis (one hemisphere) and {"0": (0.5, 1.0)} evaluates on the other;
  # None = the whole volume (the configs' default; their `heldout` token sets the task's regions, jaxvol.data.tasks).
  # Either form is accepted on the command line: --config.data.eval_region=None or
  # --config.data.eval_region="{'2': (0.6, 1.0)}" (`region_field`).
  d.train_region = region_field()
  d.eval_region = region_field()
  d.train_split = "train"

  c.model = m = ml_collections.ConfigDict()
  m.base_width = 32
  m.channel_mults = (1, 2, 4)
  m.num_res_blocks = 1
  m.attention_levels = ()      # level indices (0 = full network resolution) with self-attention
  m.num_heads = 4
  m.groups = 8                 # GroupNorm groups (largest divisor of the width <= this)
  m.dropout = 0.0
  m.time_embed_dim = 128
  m.remat = "none"             # none | full | dots: rematerialise ResBlock activations
  m.stm = False                # STM: structure code of the condition modulates time embeddings
  m.stm_dim = 128              # STM structure-code width
  # jaxvol | authors: the sparse-diffusion authors' U-Net (additive time embedding, narrower
  # decoder, symmetric strided downsampling, zero-initialised output conv, GroupNorm eps 1e-5,
  # no middle attention, their STM encoder; the sparse configs' default); jaxvol.models.unet3d.
  m.layout = "jaxvol"
  m.init = "flax"              # flax (Flax's defaults) | torch (PyTorch's layer defaults, as the
  #                              authors' code starts: jaxvol.models.layers.torch_default_init)
  # True: residual learning (Zhang et al., "Beyond a Gaussian Denoiser: Residual Learning of Deep
  # CNN for Image Denoising", IEEE TIP 2017): the network's clean-image estimate is the first
  # input plus the network's output, so an untrained network starts near the input instead of near
  # zero and learns only the input's error. Regression's prediction, the x0 estimate of full3d
  # and sparse (x0 parameterisation), PPDM's and puzzle regression's (jaxvol.methods.base.
  # Method.RESIDUAL; the others refuse it). For tasks whose input is normalised like the target
  # (denoising); training refuses a store where it is not (jaxvol.train.loop.check_residual).
  m.residual = False

  c.ppdm = p = ml_collections.ConfigDict()
  p.factor = (2, 2, 2)         # puzzle factor r per axis (rd, rh, rw), e.g. (1, 2, 2) if anisotropic
  p.num_steps = 1000           # bridge T
  p.max_var = 1.0              # bridge s in delta_t = 2 s (m_t - m_t^2); 0 = plain interpolation
  p.sample_steps = 10          # K skipped sampling steps from x_T = y
  p.eta = 0.0                  # posterior noise scale while sampling (0 deterministic, 1 ancestral)
  p.loss = "l1"                # l1 | l2 on the puzzled x0 estimate
  p.grad_loss_weight = 0.5     # lambda of the puzzle-gradient loss

  c.diffusion = g = ml_collections.ConfigDict()  # Gaussian DDPM for full3d and wdm
  g.objective = "diffusion"    # diffusion: the method's own noise diffusion (DDPM for full3d,
  #                              the trigonometric one for prdit) | flow: straight-line flow
  #                              matching (c.flow; full3d and prdit)
  g.num_steps = 1000
  g.beta_start = 1e-4
  g.beta_end = 0.02
  g.parameterization = "eps"   # eps | x0 | v
  g.sample_steps = 50          # DDIM steps
  g.eta = 0.0
  g.clip_x0 = 1.0              # clip the x0 estimate to [-c, c] while sampling (DDPM); 0: off
  #                              (wdm: clamped in image space, idwt -> clip -> dwt). 1 fits the
  #                              CT window, which the preset clips; PET/MRI presets do not clip,
  #                              so their configs widen it (clamp_for_preset)

  # The KL autoencoder of latent diffusion (method "autoencoder"; jaxvol.models.autoencoder,
  # MAISI's design): `factor` x downsampling per axis to `latent_channels` channels.
  c.autoencoder = ae = ml_collections.ConfigDict()
  ae.latent_channels = 4       # MAISI's 4
  ae.factor = 4                # downsampling per axis (a power of 2; MAISI's 4)
  ae.width = 32                # width of the first level
  ae.channel_mults = ()        # per level (log2(factor) + 1 of them); () = all 1
  ae.num_res_blocks = 1        # residual blocks per level
  ae.groups = 8                # GroupNorm groups
  ae.kl_weight = 1e-6          # weight of the KL term beside the L1 reconstruction (small, as
  #                              MAISI's)
  ae.decode_window = ()        # latent voxels per decoding window; () = decode whole volumes
  ae.adv_weight = 0.0          # > 0: a 3D patch discriminator's least-squares term, this weight
  ae.adv_start = 0             # ... from this step on (the generator's warm-up)
  ae.disc_width = 32           # the discriminator's first width (doubling per layer)
  ae.disc_layers = 3           # its strided convolutions

  # Latent diffusion (method "ldm", jaxvol.methods.ldm): full3d's diffusion on the latents of a
  # frozen autoencoder (c.autoencoder's architecture) copied from another run.
  c.ldm = ld = ml_collections.ConfigDict()
  ld.autoencoder_workdir = ""  # the trained autoencoder run (method "autoencoder"), required
  ld.latent_scale = 1.0        # latents are multiplied by this before diffusion (LDM's scale
  #                              factor, about 1 / std of the training latents)

  # Flow matching (config.diffusion.objective = "flow"; jaxvol.diffusion.flow, PRDiT-FM's
  # conventions: t = 0 noise, t = 1 data, x_t = (1 - t) noise + t data, velocity head).
  c.flow = fl = ml_collections.ConfigDict()
  fl.solver = "euler"          # euler (N evaluations, PRDiT-FM's default) | heun (2N)
  fl.sample_steps = 100        # ODE steps N (PRDiT-FM's num_sampling_steps)
  fl.embed_t_scale = 1000.0    # the network's time input is t * this (PRDiT-FM's)
  fl.val_t = 0.5               # PRDiT-FM's stage-1 validation: reconstruct from x_t at this t

  # Wavelet diffusion (method "wdm") as pfriedri/wdm-3d does it; uses c.diffusion.
  c.wdm = w = ml_collections.ConfigDict()
  w.lll_scale = 3.0            # LLL band divided by this before diffusion, multiplied back before
  #                              the inverse transform (wdm-3d: 3; 1: plain orthonormal Haar bands)

  c.sparse = s = ml_collections.ConfigDict()  # sparse-timestep DDPM (uses c.diffusion's schedule)
  s.f_steps = 5                # levels floor(linspace(0, T - 1, f_steps + 1)); 5 -> {0, 199, .., 999}
  s.timesteps = ()             # explicit level set instead (ints in [0, T)); () = from f_steps
  s.heun = True                # Heun correction of the DDIM moves while sampling
  s.final_denoise = False      # True: end with one more x0 evaluation at the lowest level
  s.levels = "linspace"        # level rule from f_steps: linspace (ours) | arange (the authors':
  #                              truncated arange(-1, T, T / f_steps); f = 3 -> {0, 332, 665, 999})
  # jaxvol (heun_ddim_sample) | authors (their loop: DDIM with their no-op corrections and the
  # averaged t = -1 ending, 2 f_steps + 1 evaluations); jaxvol.diffusion.sparse.
  s.sampler = "jaxvol"

  # PRDiT (method "prdit"): unconditional generation with a per-token local denoiser (stage 1)
  # and a global residual DiT on top of it (stage 2); jaxvol.methods.prdit. The paper's
  # "PRDiT-B/12/4" is size B, patch 12, depth 4.
  c.prdit = r = ml_collections.ConfigDict()
  r.size = "B"                 # S | B | L | XL: residual DiT width and heads (PRDIT_SIZES)
  r.patch = 12                 # token window p (voxels per side, p - stride even)
  r.stride = 8                 # token stride s: each token predicts its s^3 block
  r.depth = 4                  # residual DiT blocks
  r.width = 0                  # > 0 overrides the width of `size` (tiny test models)
  r.heads = 0                  # > 0 overrides the attention heads of `size`
  r.mlp_ratio = 4.0            # residual DiT MLP width / width
  r.time_width = 0             # > 0: width of the shared time MLP; 0: the DiT width (the
  #                              authors', also in stage 1)
  r.dit_init_gain = 0.1        # xavier gain of the residual DiT's Dense layers (the authors')
  r.local_width = 0            # 0: the local denoiser works on the raw p^3 window (the paper's
  #                              layout); > 0: a per-token Dense to this width first
  r.local_blocks = 2           # SwiGLU blocks of the local denoiser
  r.local_mlp_ratio = 1.0      # SwiGLU hidden width / local width
  r.attention = "auto"         # auto | xla | cudnn | chunked | splash (jaxvol.models.attention)
  r.chunk_size = 512           # query/key chunk of the chunked backend
  r.remat = "none"             # none | full | dots | dots_saveable: per DiT block
  r.stage = 2                  # 1: train the local denoiser; 2: train the residual DiT on top of
  #                              the frozen stage-1 weights (loaded from stage1_workdir)
  r.num_steps = 1000           # T of the trigonometric diffusion
  r.sigma = 0.5                # noise std: x_t = cos(th) x0 + sin(th) eps, eps ~ N(0, sigma^2)
  r.sampler = "euler"          # euler (probability flow, the authors' default) | pc
  #                              (their predictor-corrector; with 100 steps the fast option)
  r.predictor = "euler"        # predictor of the pc sampler: euler (the authors') | ddim
  r.sample_steps = 1000        # network evaluations per generated volume (a divisor of num_steps)
  r.sample_output = "x0"       # x0: the network's estimate at the last step (t = 0) | x: the
  #                              sampler's final state (the authors save both)
  r.layout = 2                 # parameter layout this version builds (jaxvol.models.prdit);
  #                              saved with every checkpoint so older layouts are refused
  # Stage 2: WORKDIR of the stage-1 run; its latest checkpoint's weights (source_weights) become
  # the frozen "local" parameters (the optimizer keeps no state for them).
  r.stage1_workdir = ""
  # Warm start (e.g. 256^3 from a 128^3 run): WORKDIR of any PRDiT run; every parameter whose
  # path and shape match is copied from its latest checkpoint (source_weights) except the time
  # fine head (re-initialised, as the authors do), the rest keep their fresh init, and the copied
  # ones train at warm_start_lr_scale x the learning rate.
  r.warm_start_workdir = ""
  r.warm_start_lr_scale = 0.1
  r.source_weights = "raw"     # raw (the authors') | ema: which weights of those runs are copied

  c.inference = i = ml_collections.ConfigDict()  # how samplers cover a volume (every method)
  i.window = ()                # () = whole volume in one pass; (d, h, w) = sliding windows this big,
  #                              e.g. the training crop; a multiple of the method's spatial multiple
  i.overlap = 0.5              # window overlap fraction per axis
  i.sigma_scale = 0.125        # Gaussian blending sigma / window size (<= 0: plain averaging)
  i.batch = 2                  # windows per device per network call (spread over local devices)
  # Geometric self-ensemble (Lim et al., "Enhanced Deep Residual Networks for Single Image
  # Super-Resolution", CVPRW 2017, in 3D): the spatial axes (0 = depth, 1, 2 of the network's
  # volume) whose every combination of flips is sampled, flipped back and averaged; (0, 1, 2) =
  # 8 passes, () = one. For conditional methods trained with data.flips (jaxvol.eval.samplers).
  i.flip_axes = ()

  c.regression = r = ml_collections.ConfigDict()
  r.loss = "l1"                # l1 | l2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1             # -1: all devices not used by the other axes
  c.mesh.spatial = 1           # shards the volume depth axis of activations and batches
  c.mesh.model = 1
  # Train state layout (jaxvol.parallel.sharding.state_layouts): "replicated" keeps every U-Net
  # parameter, its AdamW moments and its EMA copy whole on every device; "zero1" (ZeRO stage 1)
  # splits the moments and the EMA copy over the data x spatial devices, on each leaf's largest
  # dimension they divide; "fsdp" splits the parameters too, at rest: the step all-gathers the whole
  # parameter tree once, before the network (not layer by layer), and each device keeps its slice
  # of the all-reduced gradients, so the step still holds every parameter and gradient while it
  # runs. Leaves sharded over "model" keep that layout; with data x spatial = 1 every mode is
  # "replicated".
  c.mesh.state_sharding = "replicated"
  # Leaves under this many elements stay replicated in every mode: each split leaf costs the step
  # collectives whose latency outweighs the bytes saved below ~64 KiB (2**14 float32), and the
  # biases, norm scales and thinnest kernels under it hold < 1% of the benchmark U-Net's bytes
  # (experiments/spatial_scaling.py), whose 3x3x3 kernels of width 32 (27,648 elements) are split.
  c.mesh.state_sharding_min_size = 2**14

  # Multi-host runs (jaxvol.train.distributed, docs/launch.md): read by `--distributed`, and a
  # non-empty coordinator_address or num_processes starts the runtime without the flag. Empty
  # fields are detected by JAX from SLURM, Open MPI or Cloud TPU (JAX_COORDINATOR_ADDRESS gives
  # the coordinator elsewhere). config.data.batch_size stays the GLOBAL batch: each host feeds its
  # share.
  c.distributed = x = ml_collections.ConfigDict()
  x.coordinator_address = ""   # "host:port" of process 0's coordinator; "" = auto
  x.num_processes = 0          # processes in the job; 0 = auto
  x.process_id = -1            # this process, 0 .. num_processes - 1; -1 = auto
  x.local_device_ids = ()      # accelerators this process uses, e.g. (0,); () = auto
  x.cpu_collectives = ""       # CPU only: "gloo" lets processes on one machine compute together
  x.num_cpu_devices = 0        # CPU only: > 0 fakes this many devices per process (testing)

  c.train = t = ml_collections.ConfigDict()
  t.steps = 10000
  t.learning_rate = 1e-4
  t.warmup_steps = 100         # linear warm-up from 0; 0 = the full rate from the first step
  t.lr_schedule = "constant"   # after warm-up: constant | cosine (decay to lr_final x the rate
  #                              at train.steps)
  t.lr_final = 0.0
  t.weight_decay = 1e-4
  t.grad_clip = 1.0            # global-norm clipping; 0 = none
  t.ema_decay = 0.999
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 3
  t.time_limit_minutes = 0.0   # > 0: stop (with a checkpoint) after this much training time
  # Validation during training (jaxvol.train.loop.Validation): every validate_every steps (0 =
  # never) the model is scored on config.eval.val_split / val_region through the one inference
  # path; the best step by validate_metric is kept in WORKDIR/best_checkpoint (what evaluate,
  # sample and predict use by default), the scores in WORKDIR/validation.jsonl; patience P > 0
  # stops training after P validations in a row without improvement.
  t.validate_every = 0
  t.validate_metric = "psnr"
  t.patience = 0

  c.eval = e = ml_collections.ConfigDict()
  # Which checkpoint evaluate, sample and predict read (jaxvol.train.checkpoint.restore_selected):
  # auto (the best validation checkpoint when training validated, else the latest) | best |
  # latest | a step number; `--checkpoint=` on the command line. checkpoint_step >= 0 (older
  # commands) names a step and wins.
  e.checkpoint = "auto"
  e.checkpoint_step = -1
  # The validation set of training (config.train.validate_every): a split, and a region of it
  # (None: config.data.eval_region), disjoint from the training crops and from the test voxels.
  e.val_split = "val"
  e.val_region = region_field()
  # Classical references scored beside the model (jaxvol.eval.references), tuned on the training
  # split's training region: "auto" (Gaussian + BM4D or non-local means where the input shares
  # the target's units; an intensity look-up table, alone and + Gaussian, where it does not), a
  # comma-separated list of names, or "" for none. Tuning reads each training subject's region cut
  # to a centred box of at most reference_tune_box voxels, from at most reference_tune_subjects.
  e.references = "auto"
  e.reference_tune_box = (48, 48, 48)
  e.reference_tune_subjects = 4
  e.use_ema = True
  e.split = "test"
  e.mask = "body"              # body | none: where metrics are computed
  e.previews = True
  e.input_baseline = False     # also score the condition as the prediction (same-scale tasks only)
  e.seed = 0
  e.samples = 1                # > 1: the prediction is the mean of N samples, plus a std map
  # Largest box (D, H, W) scored per volume, centred in the evaluation region; () = the whole
  # region. The smoke variants set a small one so a smoke evaluation takes seconds on a CPU.
  e.max_box = ()
  # Feature network of the generation metrics (FID/MMD, jaxvol.eval.generation): a MedicalNet
  # checkpoint (tools/convert_medicalnet.py output) or "" for a randomly initialised MedicalNet
  # ResNet of feature_depth and feature_width (reported as "FD (random features)", not FID).
  e.feature_weights = ""
  e.feature_weights_sha256 = ""  # expected SHA-256 of feature_weights; "" = record it, no check
  e.feature_depth = 50
  e.feature_width = 64
  e.feature_resize = ()        # () = volumes as sampled; (d, h, w) = trilinear resize first
  # Generation metrics protocol (jaxvol.eval.generation's module docstring):
  #   "authors": PRDiT's evaluation code: network-range [-1, 1] volumes into MedicalNet as they
  #     are, FID by scipy sqrtm, sqrt(MMD^2) with the real-real median bandwidth, MONAI's 3D
  #     MS-SSIM (kernel 3, data range 1, sides >= 48) over all pairs of generated volumes;
  #   "jaxvol": volumes in original units, z-scored per volume before MedicalNet, MMD^2 with
  #     the pooled median bandwidth, jaxvol's 7-voxel MS-SSIM over 100 random pairs.
  e.generation_protocol = "authors"
  e.ms_ssim_pairs = 0          # MS-SSIM pairs per set; 0 = the protocol's (all / 100 random)

  # --mode=sample for unconditional methods (no config.data.inputs): WORKDIR/samples/
  # sample_{i:03d}.nii.gz in the target's original units, drawn with fold_in(PRNGKey(seed), i).
  # Affine: diag(spacing) in RAS (x = right, y = anterior, z = superior), origin (0, 0, 0) mm at
  # the centre of the volume, i.e. voxel (i, j, k) sits at ((i, j, k) - (shape - 1) / 2) * spacing.
  c.sample = sm = ml_collections.ConfigDict()
  sm.num = 4                   # volumes to generate
  sm.shape = ()                # () = data.crop_size; each side a multiple of the method's multiple
  sm.spacing = ()              # mm per RAS axis; () = the store's first training subject's spacing
  sm.seed = 0
  sm.metrics = False           # also write generation_metrics.json against real crops (n = num)
  return c


def region_field(value: dict | None = None) -> config_dict.FieldReference:
  """A config field that holds a region ({axis: (lo, hi)}) or None, and takes either from the
  command line.

  ml_collections fixes a field's type when the config is built: a field holding None could not be
  overridden from the command line at all, and one holding a dict refuses `None`. A field typed
  `object` is parsed as a Python literal instead (`None`, `{'0': (0.5, 1.0)}`).
  """
  return config_dict.FieldReference(value, field_type=object)


def smoke_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config so one train/evaluate cycle runs in seconds on a CPU (evaluation scores at
  most a centred 32^3 box of each volume: config.eval.max_box)."""
  c.eval.max_box = (32, 32, 32)
  c.eval.references = "cheap"  # Gaussian or look-up table: the others cost seconds per volume
  c.eval.reference_tune_box = (24, 24, 24)
  c.eval.reference_tune_subjects = 2
  c.model.base_width = 8
  c.model.channel_mults = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attention_levels = ()
  c.model.groups = 4
  c.model.time_embed_dim = 32
  c.data.crop_size = (16, 16, 16)
  c.data.batch_size = 2
  c.train.steps = 4
  c.train.warmup_steps = 1
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.ppdm.sample_steps = 3
  c.diffusion.sample_steps = 3
  return c


def mri_t1_t2_task(c: ml_collections.ConfigDict,
                   heldout: bool = False) -> ml_collections.ConfigDict:
  """T1 -> T2 translation: store modalities `t1` and `t2` (MRI percentile presets).

  By default whole volumes of the `train` split train and whole volumes of the `test` split are
  scored. `heldout` is the split of the repository's one co-registered subject
  (tools/prepare_data.py --task mri_t1_t2): training crops come from the low-index half of the
  RAS x axis (the subject's left), evaluation uses the other half of the same subject (split
  `train`); every reported number says so.
  """
  c.data.inputs = ("t1",)
  c.data.target = "t2"
  c.data.train_split = "train"
  apply_split(c, "mri_t1_t2", heldout)
  c.eval.input_baseline = False  # T1 intensities are not a T2 prediction
  return clamp_for_preset(c, "mri")


# PET and MRI presets are linear and NOT clipped (hot lesions above the PET cap, bright MRI above
# the 99.5th percentile keep their values), so normalised targets exceed 1: up to about 1.3-1.6 on
# this repository's data. Samplers that clamp their x0 estimate must not cut them: the configs of
# PET/MRI targets clamp at +-2 instead of +-1, and training warns when the store's training targets
# leave that range (jaxvol.train.loop.check_target_range). CT presets clip to their window, so 1.
UNCLIPPED_CLAMP = 2.0


def clamp_for_preset(c: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """Sets config.diffusion.clip_x0 to cover the range of the target preset kind ('ct' keeps 1)."""
  c.diffusion.clip_x0 = 1.0 if kind in ("ct", "identity") else UNCLIPPED_CLAMP
  return c


# The held-out split of each task's shared-data stores (variant token `heldout`): the regions and
# splits of jaxvol.data.tasks (one record per task). The stores of `jaxvol prepare` hold one
# subject (mri_t1_t2, mri_sr: one hemisphere trains, the other of the same subject is scored) or
# test subjects that share the training subjects' anatomy (pet_denoise, pet_ac, the demo's
# phantom; ct_denoise: one CT with new noise), so no evaluated anatomy is trained on; validation
# (config.eval.val_split / val_region, the best checkpoint and patience during training) is
# disjoint from both.
HELDOUT = "heldout"  # the variant token of the held-out split (jaxvol.data.tasks)
WHOLE = "whole"      # the default named explicitly (older commands); excludes `heldout`
SPLIT_TOKENS = (HELDOUT, WHOLE)


# The variant token of whole-volume training (the PPDM configs; `apply_fullvolume`). Not `whole`,
# which names the split (whole volumes of the test split are scored).
FULLVOLUME = "fullvolume"


def apply_fullvolume(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Trains on whole regions instead of crops: the `fullvolume` token of the PPDM configs.

  Sets config.data.crops = "whole" (jaxvol.data.pipeline.WholeRegion: each training example is a
  subject's whole training region, edge-padded at its end, flips as configured) and samples in
  one pass (config.inference.window = ()). The compiled train step has one shape, the padded
  region: a config cannot know the store's shape, so training (and `jaxvol plan` with a store)
  sets config.data.crop_size from the store's manifest (jaxvol.train.loop.resolve_whole_crop,
  `jaxvol.data.pipeline.whole_crop_size`); a crop_size that does not cover every subject's region
  stops before the first step with a message naming the region's shape.
  """
  c.data.crops = "whole"
  c.inference.window = ()
  return c


def apply_split(c: ml_collections.ConfigDict, task: str,
                heldout: bool) -> ml_collections.ConfigDict:
  """Whole volumes, train split -> test split (default), or the task's held-out split
  (jaxvol.data.tasks: training, validation and evaluation regions)."""
  if heldout:
    t = tasks_lib.get(task)
    if not t.heldout:
      raise ValueError(f"task {task!r} has no held-out split (jaxvol.data.tasks)")
    c.data.train_region, c.data.eval_region = dict(t.train_region), dict(t.eval_region)
    c.eval.split = t.eval_split
    c.eval.val_split = t.val_split
    c.eval.val_region = None if t.val_region is None else dict(t.val_region)
  else:
    c.data.train_region = c.data.eval_region = None
    c.eval.split = "test"
    c.eval.val_split, c.eval.val_region = "val", None
  return c


def pet_regions() -> tuple[dict, dict]:
  """(train_region, eval_region) of the `heldout` split of the PET tasks whose subjects share one
  anatomy (the stores of tools/prepare_data.py and the demo's phantom): RAS z in [0, 0.6) for
  training, [0.6, 1] for evaluation."""
  t = tasks_lib.get("pet_denoise")
  return dict(t.train_region), dict(t.eval_region)


def variant_tokens(variant: str | None, known: Iterable[str],
                   exclusive: Sequence[Iterable[str]] = ()) -> list[str]:
  """The comma-separated tokens of a config variant, checked.

  Args:
    variant: the part of --config after ':' (None or "" for none).
    known: the tokens the config takes.
    exclusive: groups of tokens of which at most one may be given (`SPLIT_TOKENS` is always one).

  Returns:
    The tokens in the order given.

  Raises:
    ValueError: (its message says "variant") an unknown token, or two of one exclusive group.
  """
  tokens = [t.strip() for t in (variant or "").split(",") if t.strip()]
  known = sorted(set(known))
  groups = [tuple(g) for g in exclusive]
  if set(SPLIT_TOKENS) <= set(known):
    groups.append(SPLIT_TOKENS)
  unknown = [t for t in tokens if t not in known]
  clash = [g for g in groups if sum(t in g for t in tokens) > 1]
  if unknown or clash:
    why = (f"unknown token(s) {', '.join(unknown)}" if unknown else
           "; ".join(f"at most one of {'/'.join(g)}" for g in clash))
    raise ValueError(f"bad variant {variant!r}: {why} (comma-separated tokens from "
                     f"{', '.join(known)})")
  return tokens


def with_tokens(variant: str | None, *tokens: str) -> str:
  """`variant` with `tokens` appended where missing, e.g. ("cpu", "heldout") -> "cpu,heldout"."""
  have = [t.strip() for t in (variant or "").split(",") if t.strip()]
  return ",".join(have + [t for t in tokens if t not in have])


def set_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Selects a method with the choices its paper makes where they differ from the defaults (the
  method's `CONFIG_DEFAULTS`, jaxvol.methods.base.Method)."""
  c.method = method
  for field, value in methods.method_class(c).CONFIG_DEFAULTS.items():
    section, name = field.split(".")
    c[section][name] = value
  return c


AUTOENCODER_SIZES = {  # (width, channel_mults, groups) of the KL autoencoder per size token
    "paper": (64, (1, 2, 2), 8),  # MAISI's first stage, for accelerators
    "cpu": (8, (1, 2, 2), 4),
    "smoke": (4, (1, 1, 2), 2),
}


def autoencoder_size(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """The autoencoder of a size token; the autoencoder's config and every latent-diffusion config
  that uses it call this with the same token, so their architectures agree."""
  a = c.autoencoder
  a.width, a.channel_mults, a.groups = AUTOENCODER_SIZES[size]
  a.num_res_blocks, a.latent_channels, a.factor = 1, 4, 4
  return c


def mri_t1_t2_config(method: str, variant: str | None) -> ml_collections.ConfigDict:
  """The T1 -> T2 experiment for one method; every method shares the same U-Net and budget.

  Variant tokens, comma-separated: `smoke` (seconds on CPU) or `cpu` (about 10 minutes of
  training on 2 CPU cores: `cpu_task_overrides`), and `heldout` (the one-subject hemisphere split,
  `mri_t1_t2_task`) or `whole` (the default: whole volumes, test split); for PPDM also
  `fullvolume` (train on the whole training region instead of crops: `apply_fullvolume`).
  """
  extra = (FULLVOLUME,) if method == "ppdm" else ()
  tokens = variant_tokens(variant, ("smoke", "cpu") + SPLIT_TOKENS + extra, [("smoke", "cpu")])
  c = set_method(mri_t1_t2_task(base_config(), HELDOUT in tokens), method)
  c.data.crop_size = (64, 64, 64)
  c.model.base_width = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 2
  if "smoke" in tokens:
    smoke_overrides(c)
  elif "cpu" in tokens:
    cpu_task_overrides(c)
  if FULLVOLUME in tokens:
    apply_fullvolume(c)
  if method == "ldm":  # the autoencoder of ldm_autoencoder.py with the same size token
    autoencoder_size(c, "smoke" if "smoke" in tokens else "cpu" if "cpu" in tokens else "paper")
    c.inference.window = ()  # the latent is sampled whole; the decoder may use windows
  return c


SPARSE_TASKS = ("ct_denoise", "mri_sr", "pet_denoise")


def _sparse_paper_model(c: ml_collections.ConfigDict) -> None:
  """The paper's network and optimiser (DESIGN.md 2.2): the authors' U-Net layout (additive time
  embedding, narrower decoder, their STM encoder; it measured 1.6 dB better than jaxvol's layout in
  experiments/sparse_ablation.py, docs/results.md "Sparse diffusion ablation"), width 64, mults
  (1,1,2,2,4), 2 res blocks, 4-head attention at the 1/8 level, GroupNorm 32, dropout 0.1, time
  embedding 256, AdamW 1e-4 with weight decay 1e-4, EMA 0.99, batch 8."""
  m = c.model
  m.layout = "authors"
  m.base_width, m.channel_mults, m.num_res_blocks = 64, (1, 1, 2, 2, 4), 2
  m.attention_levels, m.num_heads, m.groups = (3,), 4, 32
  m.dropout, m.time_embed_dim = 0.1, 256
  c.train.learning_rate, c.train.weight_decay, c.train.ema_decay = 1e-4, 1e-4, 0.99
  c.data.batch_size = 8


def cpu_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A network and budget that train in minutes on a 2-core CPU (docs/results.md's runs)."""
  # XLA's CPU 3D convolutions run at 3-6 GFLOP/s: width 16 at 32^3 (56 GFLOPs per step) would
  # take ~11 s per step, width 8 at 16^3 (~1.7 GFLOPs) about 0.3 s.
  m = c.model
  m.base_width, m.channel_mults, m.num_res_blocks = 8, (1, 2, 4), 1
  m.attention_levels, m.groups, m.dropout, m.time_embed_dim = (), 4, 0.0, 32
  m.stm_dim = 32
  c.data.crop_size = (16, 16, 16)
  c.data.batch_size = 4
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 20
  c.train.steps = 3000
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.time_limit_minutes = 10.0
  return c


def demo_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CPU budget of PPDM, WDM and latent diffusion, and the base of the quick start
  (tools/demo.py, ppdm_pet_denoise:demo, which adds its own loss, steps and inference): 32^3
  crops, a 16-wide U-Net with one res block, AdamW 5e-4, 3000 steps within 10 minutes (7 minutes
  on an idle 2-core CPU). For networks that run below the crop's resolution (PPDM r=2 on the
  puzzled grid, WDM on Haar bands)."""
  m = c.model
  m.base_width, m.channel_mults, m.num_res_blocks = 16, (1, 2, 4), 1
  m.attention_levels, m.groups, m.time_embed_dim = (), 8, 64
  c.data.crop_size = (32, 32, 32)
  c.data.batch_size = 2
  t = c.train
  t.learning_rate, t.warmup_steps, t.steps = 5e-4, 20, 3000
  t.log_every, t.checkpoint_every, t.time_limit_minutes = 50, 250, 10.0
  c.ppdm.sample_steps = 5
  return c


def cpu_task_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `cpu` variant of a PPDM, WDM, full3d or regression config: about 10 minutes of training
  on 2 CPU cores, enough to beat noise.

  Methods whose network runs below the crop's resolution (the Method's `LOW_RESOLUTION`: PPDM
  r = 2, WDM, latent diffusion) get the quick start's budget (`demo_overrides`); the others (full3d, regression)
  run at full resolution, 8x the voxels per
  step, and get `cpu_overrides` (16^3 crops, width 8) with sampling in Gaussian-blended windows of
  the crop (a 16^3-trained network transfers poorly to a whole-volume pass).
  """
  if methods.method_class(c).LOW_RESOLUTION:
    return demo_overrides(c)
  cpu_overrides(c)
  c.inference.window = tuple(c.data.crop_size)
  return c


def _sparse_authors(c: ml_collections.ConfigDict, task: str, paper_size: bool) -> None:
  """The sparse-diffusion authors' network, sampler and training recipe (DESIGN.md 2.2, checked
  against mirthAI/sparse-3d-diffusion): their U-Net layout and STM encoder, their level sets and
  sampler (11 evaluations for f_steps = 5), no gradient clipping, no warm-up, float32, crops on a
  fixed 50%-overlap grid without flips, raw (not EMA) weights at evaluation, and 96^3 PET patches
  at the paper's size. The sizes of `smoke`/`cpu` are kept when combined with them."""
  c.model.layout = "authors"
  c.model.init = "torch"  # their network starts from PyTorch's layer defaults
  c.sparse.sampler, c.sparse.levels = "authors", "arange"
  c.diffusion.clip_x0 = 1.0  # theirs, whatever the preset (training warns if targets leave it)
  c.train.grad_clip, c.train.warmup_steps = 0.0, 0
  c.compute_dtype = "float32"
  c.data.crops, c.data.flips = "grid", False
  c.eval.use_ema = False  # their sampling script loads modelNNNNNN.pt, not the EMA file
  if paper_size and task == "pet_denoise":
    c.data.crop_size = (96, 96, 96)


def sparse_config(task: str, variant: str | None) -> ml_collections.ConfigDict:
  """Sparse voxel-space diffusion with STM for one enhancement task (configs/sparse_*.py).

  Variant tokens, comma-separated: `smoke` (seconds on CPU) or `cpu` (minutes on 2 CPU cores),
  `authors` (the authors' network, sampler and training recipe: `_sparse_authors`; combines with
  smoke/cpu, whose sizes it keeps), `heldout` (the region split of the task's shared-data store,
  jaxvol.data.tasks; default: whole volumes, train -> test split; `whole` names the default), and
  for mri_sr the factor `x2` (default) or `x4`. Every variant samples volumes larger than the
  training patch in Gaussian-blended windows of the patch size.
  """
  if task not in SPARSE_TASKS:
    raise ValueError(f"unknown sparse task {task!r}; expected one of {SPARSE_TASKS}")
  factors = ("x2", "x4") if task == "mri_sr" else ()
  tokens = variant_tokens(variant, ("smoke", "cpu", "authors") + factors + SPLIT_TOKENS,
                          [("smoke", "cpu")] + ([factors] if factors else []))
  c = set_method(base_config(), "sparse")
  _sparse_paper_model(c)
  c.eval.mask = "body"
  if task == "ct_denoise":
    # Low-dose -> full-dose CT (tools/prepare_data.py --task ct_denoise: one CT, new noise on the
    # test subject); metrics in HU.
    c.data.inputs, c.data.target = ("ct_low",), "ct"
    c.eval.input_baseline = True
    # The paper's 128^3 does not fit this CT (122x101x112; 122x101x67 in the heldout training
    # region).
    c.data.crop_size = (64, 64, 64)
  elif task == "mri_sr":
    factor = 4 if "x4" in tokens else 2
    # Thick-slice T1 -> T1 (the stroke subject's, split by hemisphere (RAS x) under `heldout`).
    c.data.inputs, c.data.target = (f"t1_x{factor}",), "t1"
    c.eval.input_baseline = True
    c.data.crop_size = (48, 96, 96)  # a hemisphere of the stroke T1 is 62 voxels wide
  else:
    # Low-count -> full-count PET (tools/prepare_data.py --task pet_denoise: new noise on test
    # subjects whose anatomy training shares, hence the `heldout` region split for that store).
    c.data.inputs, c.data.target = ("pet_low",), "pet_full"
    c.eval.input_baseline = True
    c.data.crop_size = (48, 48, 32)  # fits the heldout training region (z: 42 of 70) of the phantom
  apply_split(c, task, HELDOUT in tokens)
  clamp_for_preset(c, {"ct_denoise": "ct", "mri_sr": "mri", "pet_denoise": "pet"}[task])
  if "smoke" in tokens:
    smoke_overrides(c)
    c.model.stm_dim = 16
  elif "cpu" in tokens:
    cpu_overrides(c)
  if "authors" in tokens:
    _sparse_authors(c, task, paper_size=not {"smoke", "cpu"} & set(tokens))
  c.inference.window = tuple(c.data.crop_size)
  return c


def pnp_config(task: str, variant: str | None) -> ml_collections.ConfigDict:
  """Plug-and-play reconstruction with the patch prior of configs/patch_prior_train.py.

  The model fields are the prior's (the checkpoint in `pnp.prior_workdir`, or the workdir itself).
  Variant tokens, comma-separated: `smoke` or `cpu` (the prior's variant of the same name);
  `positions` for a prior trained with position channels; `heldout` for the stroke store's
  hemisphere split (the prior's token of the same name: it trained on RAS x in [0, 0.5), the
  other hemisphere of the same subject is reconstructed; default: whole volumes of the test
  split); for mri `r4`/`r8` (acceleration) and `multicoil`; for sr `x2`/`x4`.
  """
  extra = ("r4", "r8", "multicoil") if task == "mri" else ("x2", "x4")
  tokens = variant_tokens(variant, ("smoke", "cpu", "positions") + extra + SPLIT_TOKENS,
                          [("smoke", "cpu"), ("r4", "r8") if task == "mri" else ("x2", "x4")])
  c = set_method(base_config(), "full3d")
  c.data.inputs = ()
  c.data.target = "t1"
  clamp_for_preset(c, "mri")
  apply_split(c, "mri_t1_t2", HELDOUT in tokens)
  c.diffusion.parameterization = "v"  # the prior's (configs/patch_prior_train.py)
  c.data.crop_size = (32, 32, 32)
  c.data.batch_size = 4
  c.model.base_width, c.model.channel_mults, c.model.num_res_blocks = 32, (1, 2, 4), 2
  c.pnp = p = ml_collections.ConfigDict()
  p.prior_workdir = ""         # the prior's training workdir ("" = --workdir)
  p.prior = "patch"            # patch (shifted blended windows) | whole (one pass)
  p.solver = "diffpir"         # diffpir | dps
  p.task = task                # mri | sr | denoise
  p.acceleration = 8.0 if "r8" in tokens else 4.0
  p.mask = "equispaced"        # equispaced | random
  p.center_fraction = 0.08
  p.coils = 8 if "multicoil" in tokens else 1
  p.cg_iters = 10
  p.sr_factor = (4, 4, 4) if "x4" in tokens else (2, 2, 2)
  p.noise_std = 0.01           # measurement noise in network units
  p.num_steps = 50
  p.lam = 1.0
  p.zeta = 1.0
  p.dps_step = "paper"         # DPS step: paper (zeta / ||y - A x0_hat||, Chung et al. 2023) |
  #                              official (their code: zeta grad ||y - A x0_hat||, half as long)
  p.min_rho = 1e-3
  p.tv_lambda = 0.01
  p.tv_iters = 200
  p.seed = 0
  if "smoke" in tokens:
    smoke_overrides(c)
    p.num_steps, p.tv_iters = 3, 10
  if "cpu" in tokens:
    cpu_overrides(c)
  c.data.position_channels = "positions" in tokens
  c.data.position_axes = prior_position_axes(HELDOUT in tokens)
  c.inference.window = tuple(c.data.crop_size)
  return c


def prior_position_axes(heldout: bool) -> tuple[int, ...]:
  """The axes the patch prior's position channels encode (configs/patch_prior_train.py, and the
  reconstructions that restore it): all three on whole volumes; under `heldout` RAS y and z only,
  because the prior trains on one hemisphere (RAS x in [0, 0.5)) and the other is reconstructed,
  so an x channel would only ever see, at evaluation, coordinates it was never trained on
  (jaxvol.data.pipeline.check_position_coverage refuses it)."""
  return (1, 2) if heldout else (0, 1, 2)
