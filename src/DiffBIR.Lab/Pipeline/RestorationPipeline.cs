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
/// DiffBIR inference as the official <c>diffbir/pipeline.py</c> (HEAD): restore (cleaner) → encode (VAE of the
/// condition, CLIP of the prompts) → sample (IRControlNet-guided LDM, any sampler, optional latent tiles) → decode
/// → wavelet colour fix against the stage-1 output, resize to the output size, uint8 by truncation.
/// </summary>
public sealed class RestorationPipeline : IDisposable
{
    public Cleaner Cleaner { get; }
    public ControlLDM Cldm { get; }
    public NoiseSchedule Schedule { get; }
    /// <summary>True when the networks carry random weights (tiny preset): results say so.</summary>
    public bool NotATrainedModel { get; init; }
    /// <summary>Called with every stage's output and with notes (tiling switched off, …); return value ignored.</summary>
    public Action<PipelineEvent>? Observer { get; set; }
    /// <summary>Called after each sampler step (return false to cancel).</summary>
    public Func<StepInfo, bool>? StepObserver { get; set; }

    /// <summary>Where the networks live (the device of the UNet's first parameter); inputs are moved there.</summary>
    public Device Device => Cldm.unet.parameters().First().device;

    public RestorationPipeline(Cleaner cleaner, ControlLDM cldm, NoiseSchedule schedule)
    {
        Cleaner = cleaner; Cldm = cldm; Schedule = schedule;
    }

    List<string> _notes = new();
    void Note(string s) { _notes.Add(s); Observer?.Invoke(new PipelineEvent("note", Note: s)); }
    void Emit(string stage, Tensor t) => Observer?.Invoke(new PipelineEvent(stage, t));

    /// <summary>
    /// Restores uint8 images [N, H, W, 3] (official <c>Pipeline.run</c>). The stage-1 output must be at least 512 on
    /// both sides (the cleaners ensure it).
    /// </summary>
    public RestorationResult Run(Tensor lqUint8Nhwc, PipelineOptions? options = null)
    {
        var o = options ?? new PipelineOptions();
        PipelineChecks.Validate(o);
        if (lqUint8Nhwc.dim() != 4 || lqUint8Nhwc.shape[3] != 3)
            throw new ArgumentException($"the input must be uint8 [N, H, W, 3] (got [{string.Join(", ", lqUint8Nhwc.shape)}])");
        PipelineChecks.CheckSizes(Cleaner, lqUint8Nhwc.shape[1], lqUint8Nhwc.shape[2], "input", o);
        _notes = new List<string>();
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
        var c = ApplyCldm(condImg, o);
        var image = ImageOps.Finish(c.Sample, condImg, oh, ow);
        Emit("image", image);
        var r = new RestorationResult(image, condImg, c.CText, c.UcText, c.CImage, c.Z, c.Decoded, NotATrainedModel, _notes);
        foreach (var t in new[] { image, condImg, c.CText, c.UcText, c.CImage, c.Z, c.Decoded }) t.MoveToOuterDisposeScope();
        return r;
    }

    /// <summary>The stage-2 intermediates of <see cref="ApplyCldm"/>.</summary>
    public sealed record CldmOutput(Tensor Sample, Tensor CText, Tensor UcText, Tensor CImage, Tensor Z, Tensor Decoded);

    /// <summary>
    /// Stage 2 on a condition image in [0, 1] (official <c>apply_cldm</c>): pad to 64 (8 when any VAE-encoder or
    /// diffusion tiling is on), prepare the positive and negative conditions, pad the latent to 8 (untiled),
    /// choose the start point, noise augmentation, control strength, sample, crop, decode, crop to the input size.
    /// Returns the decoded sample in about [−1, 1], cropped, plus the intermediates.
    /// </summary>
    public CldmOutput ApplyCldm(Tensor condImg, PipelineOptions o)
    {
        using var scope = torch.NewDisposeScope();
        long bs = condImg.shape[0], h0 = condImg.shape[2], w0 = condImg.shape[3];
        bool encTiled = o.VaeEncoderTiled, decTiled = o.VaeDecoderTiled, cldmTiled = o.CldmTiled;
        var padded = ImageOps.PadToMultiplesOf(condImg, !encTiled && !cldmTiled ? 64 : 8);
        if (encTiled && (padded.shape[2] < o.VaeEncoderTileSize || padded.shape[3] < o.VaeEncoderTileSize))
        {
            Note("[VAE Encoder]: the input size is tiny and unnecessary to tile.");
            encTiled = false;
        }
        if (encTiled && o.VaeEncoderTileSize % 8 != 0) throw new ArgumentException("VAE encoder tile size must be a multiple of 8");

        // The official code encodes the image twice (once per prompt); the two c_img are identical, so we encode once.
        var prompts = Enumerable.Repeat(o.PosPrompt, (int)bs).ToArray();
        var negPrompts = Enumerable.Repeat(o.NegPrompt, (int)bs).ToArray();
        var cond = Cldm.PrepareCondition(padded, prompts, encTiled, o.VaeEncoderTileSize);
        var ucText = Cldm.clip.Encode(negPrompts);
        var cImg = cond.CImage;
        Emit("c_txt", cond.CText); Emit("uc_txt", ucText); Emit("c_img", cImg);
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
                if (o.StartPointType == StartPoint.Cond)
                {
                    var t = torch.full(new[] { bs }, Schedule.Timesteps - 1, ScalarType.Int64);
                    xT = Schedule.QSample(cImgForSampling, t, noise.Next(cImgForSampling));
                }
                else xT = noise.Next(like);
            }
            var uImg = cImgForSampling;
            if (o.NoiseAug > 0)
            {
                var t = torch.full(new[] { bs }, o.NoiseAug, ScalarType.Int64);
                cImgForSampling = Schedule.QSample(cImgForSampling, t, noise.Next(cImgForSampling));
                uImg = cImgForSampling.detach().clone();
            }
            var scales = Conditioning.Strength(o.Strength);
            var pos = new Conditioning(cond.CText, cImgForSampling, scales);
            var neg = new Conditioning(ucText, uImg, scales);
            IDenoiser model = cldmTiled ? new TiledDenoiser(Cldm, o.CldmTileSize / 8, o.CldmTileStride / 8) : Cldm;
            Guidance.Guide? guide = null;
            if (o.Guidance is not null)
            {
                var target = padded * 2 - 1;
                guide = new Guidance.Guide(o.Guidance, target)
                {
                    Decode = zz => Cldm.VaeDecode(zz),
                    EncodeTarget = img =>
                    {
                        using var like = torch.empty(new[] { img.shape[0], 4L, img.shape[2] / 8, img.shape[3] / 8 }, ScalarType.Float32, img.device);
                        return Cldm.VaeEncode(img, noise.Next(like));
                    },
                };
            }
            var cfg = new CfgDenoiser(model, pos, neg);
            var sampler = Samplers.Create(o.Sampler, Schedule, o.SamplerOptions);
            Tensor zFull;
            using (var run = sampler.Start(xT, o.Steps, noise))
                zFull = SamplingLoop.Run(run, cfg, guide, StepObserver, z => Cldm.VaeDecode(z)) ?? throw new OperationCanceledException("sampling cancelled by the observer");
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
            var decoded = Cldm.VaeDecode(z, decTiled, o.VaeDecoderTileSize / 8);
            if (!torch.isfinite(decoded).all().item<bool>())
                throw new NonFiniteException($"the decoded image has non-finite values (latents up to {z.abs().max().item<float>():G3}; cfg {o.CfgScale}, strength {o.Strength}, guidance scale {o.Guidance?.Scale ?? 0}): lower --cfg or --g-scale; nothing was written");
            Emit("decoded", decoded);
            var sample = decoded[.., .., ..(int)h0, ..(int)w0];
            var result = new CldmOutput(sample, cond.CText, ucText, cImg, z, decoded);
            foreach (var t in new[] { sample, cond.CText, ucText, cImg, z, decoded }) t.MoveToOuterDisposeScope();
            return result;
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
