using System.Text.Json.Nodes;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>Where sampling starts (official <c>--start_point_type</c>).</summary>
public enum StartPoint
{
    /// <summary>x_T ~ N(0, I).</summary>
    Noise,
    /// <summary>x_T = q_sample(c_img, t = T − 1, ε): the condition latent diffused to the last step (steadier for v1/v2).</summary>
    Cond,
    /// <summary>
    /// The paper version's <c>--better_start</c> (v2.0.0): x_T = q_sample(z_low, t = T − 1, ε) with z_low a VAE
    /// posterior sample of the low-frequency part (wavelet) of the padded condition image, encoded as c_img is (tiled
    /// or not). Draws the posterior noise (one per VAE tile) before ε.
    /// </summary>
    LowFrequency,
}

/// <summary>How the VAE encoder and decoder run on a large image when their tiling is on.</summary>
public enum VaeTiling
{
    /// <summary>HEAD's tiled VAE (<c>diffbir/utils/tilevae</c>, <see cref="Models.Vae.TiledVae"/>): padded tiles that
    /// share their GroupNorm statistics; the tile size alone is used.</summary>
    SharedGroupNorm,
    /// <summary>The paper version's <c>vae_encode_tiled</c> / <c>vae_decode_tiled</c> (v2.0.0): each tile encoded or
    /// decoded alone and the results blended with gaussian weights (<see cref="Tiling.Apply"/>), tiles of the
    /// encoder / decoder tile size every <see cref="PipelineOptions.VaeTileStride"/> pixels.</summary>
    GaussianBlend,
}

/// <summary>
/// Every knob of the official <c>Pipeline.run</c>, with inference.py's defaults (10 steps of edm_dpm++_3m_sde, CFG 6,
/// the default prompts as with <c>--captioner none</c>, tiles 512/256 for cleaner and diffusion, 256 for the VAE,
/// tiling off). Noise: <see cref="Noise"/> when given (e.g. a fixture's recorded draws), else a
/// <see cref="SeededNoise"/> of <see cref="Seed"/> (official default seed 231; torch's own stream differs).
/// </summary>
public sealed record PipelineOptions
{
    public const string DefaultPosPrompt =
        "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, hyper sharpness, perfect without deformations.";
    public const string DefaultNegPrompt =
        "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth.";

    public int Steps { get; init; } = 10;
    /// <summary>Control strength: every ControlNet output is scaled by it (official <c>control_scales = [strength]·13</c>).</summary>
    public double Strength { get; init; } = 1.0;
    public bool CleanerTiled { get; init; }
    public int CleanerTileSize { get; init; } = 512;
    public int CleanerTileStride { get; init; } = 256;
    public bool VaeEncoderTiled { get; init; }
    /// <summary>Pixels.</summary>
    public int VaeEncoderTileSize { get; init; } = 256;
    public bool VaeDecoderTiled { get; init; }
    /// <summary>Pixels (the decoder uses size / 8 latent pixels).</summary>
    public int VaeDecoderTileSize { get; init; } = 256;
    /// <summary>How the VAE tiles (HEAD's shared-GroupNorm tiles, or v2.0.0's gaussian-blended tiles).</summary>
    public VaeTiling VaeTiling { get; init; } = VaeTiling.SharedGroupNorm;
    /// <summary>Pixels between VAE tile origins, a multiple of 8; only <see cref="VaeTiling.GaussianBlend"/> uses it.</summary>
    public int VaeTileStride { get; init; } = 256;
    /// <summary>The condition image is zero-padded to a multiple of this many pixels before the VAE. Null = HEAD's rule:
    /// 64, or 8 when the VAE encoder or the diffusion is tiled. The paper version always pads to 64.</summary>
    public int? PadMultiple { get; init; }
    public bool CldmTiled { get; init; }
    /// <summary>Pixels, a multiple of 64 (the sampler uses size / 8 latent pixels).</summary>
    public int CldmTileSize { get; init; } = 512;
    public int CldmTileStride { get; init; } = 256;
    public string PosPrompt { get; init; } = DefaultPosPrompt;
    public string NegPrompt { get; init; } = DefaultNegPrompt;
    public double CfgScale { get; init; } = 6.0;
    public StartPoint StartPointType { get; init; } = StartPoint.Noise;
    /// <summary>Official sampler_type: spaced, ddim, dpm++_m2, edm_* (see <see cref="Samplers.Names"/>).</summary>
    public string Sampler { get; init; } = "edm_dpm++_3m_sde";
    /// <summary>Diffuses c_img to this timestep before sampling (0 = off).</summary>
    public int NoiseAug { get; init; }
    public bool RescaleCfg { get; init; }
    public double SChurn { get; init; }
    public double STmin { get; init; }
    public double STmax { get; init; } = 300;
    public double SNoise { get; init; } = 1;
    public double Eta { get; init; } = 1;
    public int Order { get; init; } = 1;
    public long Seed { get; init; } = 231;
    /// <summary>Replaces the seeded source (all torch.randn / randn_like calls of the official run, in order).</summary>
    public INoiseSource? Noise { get; init; }
    /// <summary>
    /// Restoration guidance of x̂₀ towards the condition image (the paper's latent image guidance). Null = the HEAD
    /// behaviour: there the pipeline only calls <c>cond_fn.load_target</c> and no sampler ever applies it, so the
    /// official outputs are those of guidance off. When set, it is applied at every step as v2.0.0 did (target
    /// = padded condition·2 − 1; rgb space through the differentiable decoder; latent space re-encodes the target
    /// with a posterior sample each repeat, drawing from the run's noise).
    /// </summary>
    public Guidance.RestorationGuidance? Guidance { get; init; }

    public SamplerOptions SamplerOptions => new(CfgScale, RescaleCfg, SChurn, STmin, STmax, SNoise, Eta, Order);

    /// <summary>
    /// The effective options as JSON for manifests, by the <c>restore</c> command's names (snake_case of its options):
    /// what the pipeline runs with, defaults included. A recorded noise source is named, not written.
    /// </summary>
    public JsonObject ToJson() => new()
    {
        ["sampler"] = Sampler, ["steps"] = Steps, ["cfg"] = CfgScale, ["rescale_cfg"] = RescaleCfg,
        ["pos_prompt"] = PosPrompt, ["neg_prompt"] = NegPrompt, ["strength"] = Strength, ["noise_aug"] = NoiseAug,
        ["start_point"] = StartPointName(StartPointType), ["s_churn"] = SChurn, ["s_tmin"] = STmin, ["s_tmax"] = STmax,
        ["s_noise"] = SNoise, ["eta"] = Eta, ["order"] = Order, ["seed"] = Seed,
        ["noise"] = Noise is null ? "seeded" : Noise.GetType().Name,
        ["guidance"] = Guidance switch { null => "none", global::DiffBIR.Lab.Guidance.WeightedMseGuidance => "wmse", global::DiffBIR.Lab.Guidance.MseGuidance => "mse", var g => g.GetType().Name },
        ["g_scale"] = Guidance?.Scale, ["g_start"] = Guidance?.TStart, ["g_stop"] = Guidance?.TStop,
        ["g_space"] = Guidance is null ? null : Guidance.Space == global::DiffBIR.Lab.Guidance.GuidanceSpace.Latent ? "latent" : "rgb",
        ["g_repeat"] = Guidance?.Repeat, ["g_patch"] = (Guidance as global::DiffBIR.Lab.Guidance.WeightedMseGuidance)?.PatchSize,
        ["g_norm"] = (Guidance as global::DiffBIR.Lab.Guidance.WeightedMseGuidance)?.Norm.ToString(),
        ["g_schedule"] = Guidance is null ? null : Guidance.Schedule?.Description ?? "constant",
        ["cleaner_tiled"] = CleanerTiled, ["cleaner_tile_size"] = CleanerTileSize, ["cleaner_tile_stride"] = CleanerTileStride,
        ["vae_encoder_tiled"] = VaeEncoderTiled, ["vae_encoder_tile_size"] = VaeEncoderTileSize,
        ["vae_decoder_tiled"] = VaeDecoderTiled, ["vae_decoder_tile_size"] = VaeDecoderTileSize,
        ["vae_tiling"] = VaeTiling == VaeTiling.GaussianBlend ? "gaussian_blend" : "shared_group_norm", ["vae_tile_stride"] = VaeTileStride,
        ["cldm_tiled"] = CldmTiled, ["cldm_tile_size"] = CldmTileSize, ["cldm_tile_stride"] = CldmTileStride,
        ["pad_multiple"] = PadMultiple,
    };

    /// <summary>The CLI's names of the start points: noise, cond, low_frequency.</summary>
    public static string StartPointName(StartPoint p) => p switch { StartPoint.Cond => "cond", StartPoint.LowFrequency => "low_frequency", _ => "noise" };

    /// <summary>The start point of a CLI name (noise, cond, low_frequency); anything else is refused naming <c>--start-point</c>.</summary>
    public static StartPoint ParseStartPoint(string name) => name switch
    {
        "noise" => StartPoint.Noise, "cond" => StartPoint.Cond, "low_frequency" => StartPoint.LowFrequency,
        _ => throw new OptionException("--start-point", $"must be noise, cond or low_frequency (got '{name}')"),
    };

    /// <summary>The official defaults of inference.py at HEAD (what <c>new PipelineOptions()</c> gives).</summary>
    public static PipelineOptions Head { get; } = new();

    /// <summary>
    /// The paper version (DiffBIR v2.0.0, <c>utils/helpers.py</c> and its inference.py defaults) as options of this
    /// pipeline: 50 steps of the spaced (DDPM) sampler, CFG 4, an empty positive prompt and v2.0.0's negative one,
    /// the condition always padded to 64 px, and — where tiling is switched on (v2.0.0 has one <c>--tiled</c> flag:
    /// set the VAE encoder, VAE decoder and diffusion tiling together, see <see cref="PaperTiled"/>) — gaussian-blended
    /// VAE tiles of 512 px every 256 px. <c>--better_start</c> is <see cref="StartPoint.LowFrequency"/>; restoration
    /// guidance is applied at every step as v2.0.0 does. The ≥ 512 px condition rule is the cleaners' (as at HEAD).
    /// </summary>
    public static PipelineOptions PaperV2_0_0 { get; } = new()
    {
        Steps = 50, Sampler = "spaced", CfgScale = 4.0,
        PosPrompt = "", NegPrompt = "low quality, blurry, low-resolution, noisy, unsharp, weird textures",
        VaeTiling = VaeTiling.GaussianBlend, VaeEncoderTileSize = 512, VaeDecoderTileSize = 512, VaeTileStride = 256,
        CldmTileSize = 512, CldmTileStride = 256, PadMultiple = 64,
    };

    /// <summary>v2.0.0's single <c>--tiled --tile_size --tile_stride</c>: the VAE encoder, the diffusion and the VAE
    /// decoder tiled with the same tiles (pixels).</summary>
    public PipelineOptions PaperTiled(int tileSize, int tileStride) => this with
    {
        VaeEncoderTiled = true, VaeDecoderTiled = true, CldmTiled = true,
        VaeEncoderTileSize = tileSize, VaeDecoderTileSize = tileSize, VaeTileStride = tileStride,
        CldmTileSize = tileSize, CldmTileStride = tileStride,
    };
}

/// <summary>What the pipeline reports while it runs (one of the stage tensors, or a note such as "tiling off").</summary>
public sealed record PipelineEvent(string Stage, Tensor? Value = null, string? Note = null);

/// <summary>
/// The restored image and every intermediate the official run computes: the stage-1 output (condition image), the
/// positive / negative text conditions and c_img, the final latent z (cropped to the condition's latent size), the
/// VAE decode of z (before cropping) and the uint8 image [N, H, W, 3]. <see cref="NotATrainedModel"/> is set for
/// images made with random weights (the <c>tiny</c> preset).
/// </summary>
public sealed record RestorationResult(
    Tensor Image, Tensor Stage1, Tensor CText, Tensor UcText, Tensor CImage, Tensor Z, Tensor Decoded,
    bool NotATrainedModel, IReadOnlyList<string> Notes) : IDisposable
{
    public void Dispose()
    {
        foreach (var t in new[] { Image, Stage1, CText, UcText, CImage, Z, Decoded }) t.Dispose();
    }
}

/// <summary>
/// The options that shape the conditioning (what <see cref="RestorationPipeline.Condition"/> computes): the prompts,
/// stage-1 tiling, VAE-encoder tiling, and whether diffusion tiling is on (it changes the padding of the condition
/// image: 64 px untiled, 8 px tiled). Tile sizes and strides count only where their tiling is on. Every other option
/// of <see cref="PipelineOptions"/> only changes sampling.
/// </summary>
public sealed record ConditionOptions(
    string PosPrompt, string NegPrompt,
    bool CleanerTiled, int CleanerTileSize, int CleanerTileStride,
    bool VaeEncoderTiled, int VaeEncoderTileSize, bool CldmTiled,
    VaeTiling VaeTiling = VaeTiling.SharedGroupNorm, int VaeTileStride = 0, int PadMultiple = 64)
{
    public static ConditionOptions Of(PipelineOptions o) => new(
        o.PosPrompt, o.NegPrompt,
        o.CleanerTiled, o.CleanerTiled ? o.CleanerTileSize : 0, o.CleanerTiled ? o.CleanerTileStride : 0,
        o.VaeEncoderTiled, o.VaeEncoderTiled ? o.VaeEncoderTileSize : 0, o.CldmTiled,
        o.VaeEncoderTiled ? o.VaeTiling : VaeTiling.SharedGroupNorm,
        o.VaeEncoderTiled && o.VaeTiling == VaeTiling.GaussianBlend ? o.VaeTileStride : 0,
        PadMultipleOf(o));

    /// <summary>The padding of the condition image: <see cref="PipelineOptions.PadMultiple"/>, or HEAD's rule (64, 8 when tiled).</summary>
    public static int PadMultipleOf(PipelineOptions o) => o.PadMultiple ?? (!o.VaeEncoderTiled && !o.CldmTiled ? 64 : 8);

    /// <summary>The first option (as the <see cref="PipelineOptions"/> property is named) that differs, or null.</summary>
    public string? FirstDifference(ConditionOptions other)
    {
        if (PosPrompt != other.PosPrompt) return nameof(PipelineOptions.PosPrompt);
        if (NegPrompt != other.NegPrompt) return nameof(PipelineOptions.NegPrompt);
        if (CleanerTiled != other.CleanerTiled) return nameof(PipelineOptions.CleanerTiled);
        if (CleanerTileSize != other.CleanerTileSize) return nameof(PipelineOptions.CleanerTileSize);
        if (CleanerTileStride != other.CleanerTileStride) return nameof(PipelineOptions.CleanerTileStride);
        if (VaeEncoderTiled != other.VaeEncoderTiled) return nameof(PipelineOptions.VaeEncoderTiled);
        if (VaeEncoderTileSize != other.VaeEncoderTileSize) return nameof(PipelineOptions.VaeEncoderTileSize);
        if (CldmTiled != other.CldmTiled) return nameof(PipelineOptions.CldmTiled);
        if (VaeTiling != other.VaeTiling) return nameof(PipelineOptions.VaeTiling);
        if (VaeTileStride != other.VaeTileStride) return nameof(PipelineOptions.VaeTileStride);
        if (PadMultiple != other.PadMultiple) return nameof(PipelineOptions.PadMultiple);
        return null;
    }
}

/// <summary>
/// An input conditioned once for any number of sampling runs (<see cref="RestorationPipeline.Condition"/> →
/// <see cref="RestorationPipeline.Sample"/>): I_RM (the stage-1 output, the condition image in [0, 1]), the condition
/// image padded for the VAE, c_img = VAE encoding of the padded image, the positive and negative text embeddings, and
/// the sizes to crop back to. A sweep over guidance, sampler, steps, CFG, strength or seed reuses it, so stage 1, the
/// VAE encoder and CLIP run once per input. Owns its tensors: dispose it when the sweep is done. Sampling never
/// changes them.
/// </summary>
public sealed class ConditionedInput : IDisposable
{
    /// <summary>I_RM: the stage-1 restoration [N, 3, H, W] in [0, 1] (official <c>cond_img</c>).</summary>
    public Tensor Stage1 { get; }
    /// <summary>I_RM padded to 64 px (8 px when VAE-encoder or diffusion tiling is on); guidance target = padded·2 − 1.</summary>
    public Tensor Padded { get; }
    /// <summary>c_img: the VAE encoding (mode) of 2·Padded − 1, scaled latent [N, 4, H/8, W/8].</summary>
    public Tensor CImage { get; }
    /// <summary>Positive text embedding (CLIP of <see cref="ConditionOptions.PosPrompt"/>, one row per image).</summary>
    public Tensor CText { get; }
    /// <summary>Negative text embedding (CLIP of <see cref="ConditionOptions.NegPrompt"/>).</summary>
    public Tensor UcText { get; }
    /// <summary>Size of the input given to <see cref="RestorationPipeline.Condition"/> (after any pre-upscale).</summary>
    public (long H, long W) InputSize { get; }
    /// <summary>Size of the final image (official <c>set_output_size</c>).</summary>
    public (long H, long W) OutputSize { get; }
    /// <summary>The options the conditioning was made with; <see cref="RestorationPipeline.Sample"/> refuses others.</summary>
    public ConditionOptions Options { get; }
    /// <summary>Notes of the conditioning (stage-1 or VAE-encoder tiling switched off, …).</summary>
    public IReadOnlyList<string> Notes { get; }
    public long BatchSize => Stage1.shape[0];

    internal ConditionedInput(Tensor stage1, Tensor padded, Tensor cImage, Tensor cText, Tensor ucText,
        (long, long) inputSize, (long, long) outputSize, ConditionOptions options, IReadOnlyList<string> notes)
    {
        Stage1 = stage1; Padded = padded; CImage = cImage; CText = cText; UcText = ucText;
        InputSize = inputSize; OutputSize = outputSize; Options = options; Notes = notes;
    }

    bool _disposed;
    public bool IsDisposed => _disposed;

    /// <summary>
    /// The same condition for a batch of <paramref name="n"/> sampling runs (each row a copy of this batch-1
    /// condition), e.g. several seeds in one pass through UNet and ControlNet: sample it with a
    /// <see cref="BatchNoise"/> of the seeds. The copy is a new value: dispose it too.
    /// </summary>
    public ConditionedInput Repeat(int n)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (BatchSize != 1) throw new InvalidOperationException($"Repeat needs a condition of one image (this one has {BatchSize})");
        if (n < 1) throw new ArgumentOutOfRangeException(nameof(n), $"a batch needs at least one run (got {n})");
        static Tensor R(Tensor t, int n) => t.repeat(t.shape.Select((_, i) => i == 0 ? (long)n : 1L).ToArray());
        return new ConditionedInput(R(Stage1, n), R(Padded, n), R(CImage, n), R(CText, n), R(UcText, n), InputSize, OutputSize, Options, Notes);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var t in new[] { Stage1, Padded, CImage, CText, UcText }) t.Dispose();
    }
}

/// <summary>
/// DiffBIR inference as the official <c>diffbir/pipeline.py</c> (HEAD): restore (cleaner) → encode (VAE of the
/// condition, CLIP of the prompts) → sample (IRControlNet-guided LDM, any sampler, optional latent tiles) → decode
/// → wavelet colour fix against the stage-1 output, resize to the output size, uint8 by truncation.
/// The first two are <see cref="Condition"/> (a value, computed once per input), the rest <see cref="Sample"/>;
/// <see cref="Run"/> is the two in a row.
/// </summary>
public sealed class RestorationPipeline : IDisposable
{
    public Cleaner Cleaner { get; }
    public ControlLDM Cldm { get; }
    public NoiseSchedule Schedule { get; }
    /// <summary>True when the networks carry random weights (tiny preset): results say so.</summary>
    public bool NotATrainedModel { get; init; }
    /// <summary>Fallback observer of every stage's output, used when a call passes none.</summary>
    [Obsolete("Pass the observer to Run / Condition / Sample instead: a property stays attached when a notebook cell throws.")]
    public Action<PipelineEvent>? Observer { get; set; }
    /// <summary>Fallback step observer, used when a call passes none (return false to cancel).</summary>
    [Obsolete("Pass the step observer to Run / Sample instead: a property stays attached when a notebook cell throws.")]
    public Func<StepInfo, bool>? StepObserver { get; set; }

    /// <summary>Where the networks live (the device of the UNet's first parameter); inputs are moved there.</summary>
    public Device Device => Cldm.unet.parameters().First().device;

    public RestorationPipeline(Cleaner cleaner, ControlLDM cldm, NoiseSchedule schedule)
    {
        Cleaner = cleaner; Cldm = cldm; Schedule = schedule;
    }

#pragma warning disable CS0618 // the obsolete properties are the fallback of the per-call arguments
    Action<PipelineEvent>? ObserverOr(Action<PipelineEvent>? given) => given ?? Observer;
    Func<StepInfo, bool>? StepObserverOr(Func<StepInfo, bool>? given) => given ?? StepObserver;
#pragma warning restore CS0618

    /// <summary>
    /// Restores uint8 images [N, H, W, 3] (official <c>Pipeline.run</c>): <see cref="Condition"/> then
    /// <see cref="Sample"/>. The stage-1 output must be at least the cleaner's condition short edge on both sides.
    /// </summary>
    public RestorationResult Run(Tensor lqUint8Nhwc, PipelineOptions? options = null, Action<PipelineEvent>? observer = null,
        Func<StepInfo, bool>? stepObserver = null, CancellationToken cancellation = default)
    {
        var o = options ?? new PipelineOptions();
        using var c = Condition(lqUint8Nhwc, o, observer);
        return Sample(c, o, observer, stepObserver, cancellation);
    }

    /// <summary>
    /// Restore + encode, once per input: the cleaner (stage 1, official <c>apply_cleaner</c>), the padding, c_img (VAE
    /// encoder) and the positive / negative text embeddings (CLIP). Only the options of <see cref="ConditionOptions"/>
    /// matter here; no noise is drawn.
    /// </summary>
    public ConditionedInput Condition(Tensor lqUint8Nhwc, PipelineOptions? options = null, Action<PipelineEvent>? observer = null)
    {
        var o = options ?? new PipelineOptions();
        PipelineChecks.Validate(o);
        if (lqUint8Nhwc.dim() != 4 || lqUint8Nhwc.shape[3] != 3)
            throw new ArgumentException($"the input must be uint8 [N, H, W, 3] (got [{string.Join(", ", lqUint8Nhwc.shape)}])");
        PipelineChecks.CheckSizes(Cleaner, lqUint8Nhwc.shape[1], lqUint8Nhwc.shape[2], "input", o);
        var obs = ObserverOr(observer);
        var notes = new List<string>();
        void Note(string s) { notes.Add(s); obs?.Invoke(new PipelineEvent("note", Note: s)); }
        void Emit(string stage, Tensor t) => obs?.Invoke(new PipelineEvent(stage, t));

        using var _ng = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var lq = lqUint8Nhwc.to(ScalarType.Float32).div(255.0).clamp(0, 1).permute(0, 3, 1, 2).contiguous().to(Device);
        var (oh, ow) = Cleaner.OutputSize(lq.shape[2], lq.shape[3]);
        if (o.CleanerTiled && !Cleaner.TilingApplies(lq, true, o.CleanerTileSize))
            Note($"[{Cleaner.Kind}]: the input size is tiny and unnecessary to tile.");
        var condImg = Cleaner.Apply(lq, o.CleanerTiled, o.CleanerTileSize, o.CleanerTileStride);
        Emit("stage1", condImg);
        int min = Cleaner.ConditionShortEdge;
        if (condImg.shape[2] < min || condImg.shape[3] < min)
            throw new InvalidOperationException(
                $"the stage-1 output is {condImg.shape[2]}×{condImg.shape[3]}; it must be at least {min} on both sides, since it is the condition of the stage-2 model");

        var result = Encode(condImg, o, (lqUint8Nhwc.shape[1], lqUint8Nhwc.shape[2]), (oh, ow), notes, obs);
        foreach (var t in new[] { result.Stage1, result.Padded, result.CImage, result.CText, result.UcText }) t.MoveToOuterDisposeScope();
        return result;
    }

    /// <summary>
    /// The encode half of <see cref="Condition"/> on a stage-1 output that the caller made (float [N, 3, H, W] in
    /// [0, 1], e.g. a model being trained): padding, c_img and the text embeddings. The result's output size is the
    /// image's own; the stage-1 size rule of the cleaner is not applied. The result owns a copy of the image.
    /// </summary>
    public ConditionedInput ConditionOnStage1(Tensor stage1, PipelineOptions? options = null, Action<PipelineEvent>? observer = null)
    {
        var o = options ?? new PipelineOptions();
        PipelineChecks.Validate(o);
        if (stage1.dim() != 4 || stage1.shape[1] != 3)
            throw new ArgumentException($"the stage-1 image must be float [N, 3, H, W] (got [{string.Join(", ", stage1.shape)}])");
        using var _ng = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var condImg = stage1.to(ScalarType.Float32).to(Device).clone();
        var size = (condImg.shape[2], condImg.shape[3]);
        var result = Encode(condImg, o, size, size, new List<string>(), ObserverOr(observer));
        foreach (var t in new[] { result.Stage1, result.Padded, result.CImage, result.CText, result.UcText }) t.MoveToOuterDisposeScope();
        return result;
    }

    ConditionedInput Encode(Tensor condImg, PipelineOptions o, (long H, long W) inputSize, (long H, long W) outputSize,
        List<string> notes, Action<PipelineEvent>? obs)
    {
        void Note(string s) { notes.Add(s); obs?.Invoke(new PipelineEvent("note", Note: s)); }
        void Emit(string stage, Tensor t) => obs?.Invoke(new PipelineEvent(stage, t));
        // (no scope of its own: the caller's scope holds these until it moves the result out)
        // Official apply_cldm, first half: pad to 64 (HEAD: 8 when any VAE-encoder or diffusion tiling is on), encode.
        long bs = condImg.shape[0];
        bool encTiled = o.VaeEncoderTiled;
        var padded = ImageOps.PadToMultiplesOf(condImg, ConditionOptions.PadMultipleOf(o));
        if (encTiled && (padded.shape[2] < o.VaeEncoderTileSize || padded.shape[3] < o.VaeEncoderTileSize))
        {
            Note("[VAE Encoder]: the input size is tiny and unnecessary to tile.");
            encTiled = false;
        }
        if (encTiled && o.VaeEncoderTileSize % 8 != 0) throw new ArgumentException("VAE encoder tile size must be a multiple of 8");
        // The official code encodes the image twice (once per prompt); the two c_img are identical, so we encode once.
        var cImage = EncodeLatent(Stages.Encode.Target(padded), o, encTiled, null);
        var cText = Cldm.clip.Encode(Enumerable.Repeat(o.PosPrompt, (int)bs).ToArray());
        var ucText = Cldm.clip.Encode(Enumerable.Repeat(o.NegPrompt, (int)bs).ToArray());
        var cond = new Conditioning(cText, cImage);
        Emit("c_txt", cond.CText); Emit("uc_txt", ucText); Emit("c_img", cond.CImage);
        var result = new ConditionedInput(condImg, padded, cond.CImage, cond.CText, ucText,
            inputSize, outputSize, ConditionOptions.Of(o), notes);
        return result;
    }

    /// <summary>The encode stage with the options' VAE tiling: mode, or a posterior sample drawn from <paramref name="posteriorNoise"/>.</summary>
    Tensor EncodeLatent(Tensor image, PipelineOptions o, bool tiled, INoiseSource? posteriorNoise) =>
        tiled && o.VaeTiling == VaeTiling.GaussianBlend
            ? Stages.Encode.BlendedTiles(Cldm, image, o.VaeEncoderTileSize, o.VaeTileStride, posteriorNoise)
            : Stages.Encode.Latent(Cldm, image, posteriorNoise, tiled, o.VaeEncoderTileSize);

    /// <summary>The decode stage with the options' VAE tiling.</summary>
    Tensor DecodeLatent(Tensor z, PipelineOptions o, bool tiled) =>
        tiled && o.VaeTiling == VaeTiling.GaussianBlend
            ? Stages.Decode.BlendedTiles(Cldm, z, o.VaeDecoderTileSize / 8, o.VaeTileStride / 8)
            : Cldm.VaeDecode(z, tiled, o.VaeDecoderTileSize / 8);

    /// <summary>
    /// One sampling run on a conditioned input (official <c>apply_cldm</c>, second half, then the colour fix): start
    /// point, noise augmentation, control strength, the sampler loop with optional restoration guidance, crop,
    /// decode, <see cref="ImageOps.Finish"/>. Options whose conditioning part (<see cref="ConditionOptions"/>) differs
    /// from the one <paramref name="condition"/> was made with are refused. The result owns copies of the condition's
    /// tensors, so it may be disposed independently.
    /// </summary>
    /// <param name="observer">Sees "z", "decoded", "image" and notes (default: the obsolete property).</param>
    /// <param name="stepObserver">Sees every sampler step; return false to cancel (default: the obsolete property).</param>
    /// <param name="cancellation">Checked after every step: the run stops with <see cref="OperationCanceledException"/>.</param>
    public RestorationResult Sample(ConditionedInput condition, PipelineOptions? options = null, Action<PipelineEvent>? observer = null,
        Func<StepInfo, bool>? stepObserver = null, CancellationToken cancellation = default)
    {
        var o = options ?? new PipelineOptions();
        ObjectDisposedException.ThrowIf(condition.IsDisposed, condition);
        PipelineChecks.Validate(o);
        if (condition.Options.FirstDifference(ConditionOptions.Of(o)) is { } differs)
            throw new ArgumentException(
                $"options.{differs} differs from the one the condition was made with: it changes the conditioning (stage 1, VAE encoder or CLIP); make a new Condition with these options",
                nameof(options));
        PipelineChecks.CheckSizes(Cleaner, condition.InputSize.H, condition.InputSize.W, "input", o);
        var obs = ObserverOr(observer);
        var steps = StepObserverOr(stepObserver);
        Func<StepInfo, bool>? onStep = steps is null && !cancellation.CanBeCanceled ? null
            : info => (steps?.Invoke(info) ?? true) && !cancellation.IsCancellationRequested;
        var notes = new List<string>(condition.Notes);
        void Note(string s) { notes.Add(s); obs?.Invoke(new PipelineEvent("note", Note: s)); }
        void Emit(string stage, Tensor t) => obs?.Invoke(new PipelineEvent(stage, t));

        using var _ng = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var condImg = condition.Stage1;
        var padded = condition.Padded;
        var cImg = condition.CImage;
        long bs = condImg.shape[0], h0 = condImg.shape[2], w0 = condImg.shape[3];
        bool decTiled = o.VaeDecoderTiled, cldmTiled = o.CldmTiled;
        long h1 = cImg.shape[2], w1 = cImg.shape[3];
        if (cldmTiled && (h1 < o.CldmTileSize / 8 || w1 < o.CldmTileSize / 8))
        {
            Note("[Diffusion]: the input size is tiny and unnecessary to tile.");
            cldmTiled = false;
        }
        var cImgForSampling = cImg;
        if (!cldmTiled) cImgForSampling = ImageOps.PadToMultiplesOf(cImg, 8);
        else if (o.CldmTileSize % 64 != 0) throw new ArgumentException("Diffusion tile size must be a multiple of 64");
        long h2 = cImgForSampling.shape[2], w2 = cImgForSampling.shape[3];

        INoiseSource noise = o.Noise ?? new SeededNoise(o.Seed);
        try
        {
            Tensor xT;
            using (var like = torch.empty(new[] { bs, 4L, h2, w2 }, ScalarType.Float32, cImgForSampling.device))
            {
                var tLast = torch.full(new[] { bs }, Schedule.Timesteps - 1, ScalarType.Int64, device: cImgForSampling.device);
                if (o.StartPointType == StartPoint.Cond)
                    xT = Schedule.QSample(cImgForSampling, tLast, noise.Next(cImgForSampling));
                else if (o.StartPointType == StartPoint.LowFrequency)
                {
                    // v2.0.0 better_start: the low-frequency part of the padded condition, encoded as c_img was (a
                    // posterior sample), diffused to the last step
                    var (_, low) = ImageOps.WaveletDecomposition(padded);
                    bool encTiled = o.VaeEncoderTiled && padded.shape[2] >= o.VaeEncoderTileSize && padded.shape[3] >= o.VaeEncoderTileSize;
                    var z0 = EncodeLatent(low, o, encTiled, noise);
                    xT = Schedule.QSample(z0, tLast, noise.Next(z0));
                }
                else xT = noise.Next(like);
            }
            var uImg = cImgForSampling;
            if (o.NoiseAug > 0)
            {
                var t = torch.full(new[] { bs }, o.NoiseAug, ScalarType.Int64, device: cImgForSampling.device);
                cImgForSampling = Schedule.QSample(cImgForSampling, t, noise.Next(cImgForSampling));
                uImg = cImgForSampling.detach().clone();
            }
            var scales = Conditioning.Strength(o.Strength);
            var pos = new Conditioning(condition.CText, cImgForSampling, scales);
            var neg = new Conditioning(condition.UcText, uImg, scales);
            IDenoiser model = cldmTiled ? new TiledDenoiser(Cldm, o.CldmTileSize / 8, o.CldmTileStride / 8) : Cldm;
            // target 2·padded − 1; latent-space guidance re-encodes it with posterior draws from the run's noise
            var guide = o.Guidance is null ? null : Stages.GuideStage.For(Cldm, o.Guidance, padded, noise);
            var sampler = Samplers.Create(o.Sampler, Schedule, o.SamplerOptions);
            if (sampler.Advisory(o.Steps) is { } advisory) Note(advisory);
            var stepper = new Stages.SampleStep(sampler, model, pos, neg);
            Tensor zFull;
            using (var state = stepper.Start(xT, o.Steps, noise))
                zFull = SamplingLoop.Run(stepper, state, guide, onStep, z => Cldm.VaeDecode(z))
                    ?? throw new OperationCanceledException(cancellation.IsCancellationRequested ? "sampling cancelled" : "sampling cancelled by the observer");
            // the run's result belongs to us and lives outside any scope: keep the crop, free the handle
            var z = zFull[.., .., ..(int)h1, ..(int)w1].clone();
            zFull.Dispose();
            if (!torch.isfinite(z).all().item<bool>())
                throw new NonFiniteException($"the sampler produced non-finite latents (cfg {o.CfgScale}, strength {o.Strength}, guidance scale {o.Guidance?.Scale ?? 0}): lower --cfg or --g-scale; nothing was written");
            Emit("z", z);
            if (decTiled && (h1 < o.VaeDecoderTileSize / 8 || w1 < o.VaeDecoderTileSize / 8))
            {
                Note("[VAE Decoder]: the input size is tiny and unnecessary to tile.");
                decTiled = false;
            }
            var decoded = DecodeLatent(z, o, decTiled);
            if (!torch.isfinite(decoded).all().item<bool>())
                throw new NonFiniteException($"the decoded image has non-finite values (latents up to {z.abs().max().item<float>():G3}; cfg {o.CfgScale}, strength {o.Strength}, guidance scale {o.Guidance?.Scale ?? 0}): lower --cfg or --g-scale; nothing was written");
            Emit("decoded", decoded);
            var sample = decoded[.., .., ..(int)h0, ..(int)w0];
            var image = ImageOps.Finish(sample, condImg, condition.OutputSize.H, condition.OutputSize.W);
            Emit("image", image);
            // the result owns copies of the condition's tensors: disposing it leaves the condition usable
            var stage1 = condImg.clone(); var cText = condition.CText.clone(); var ucText = condition.UcText.clone(); var cImgCopy = cImg.clone();
            var r = new RestorationResult(image, stage1, cText, ucText, cImgCopy, z, decoded, NotATrainedModel, notes);
            foreach (var t in new[] { image, stage1, cText, ucText, cImgCopy, z, decoded }) t.MoveToOuterDisposeScope();
            return r;
        }
        finally
        {
            if (o.Noise is null) ((IDisposable)noise).Dispose();
        }
    }

    public void Dispose() { Cleaner.Dispose(); Cldm.Dispose(); }
}

/// <summary>A run produced NaN or infinite values (options such as a huge CFG or guidance scale); nothing was written.</summary>
public sealed class NonFiniteException : InvalidOperationException
{
    public NonFiniteException(string message) : base(message) { }
}
