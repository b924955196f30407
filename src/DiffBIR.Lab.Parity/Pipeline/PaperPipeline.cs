using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>Options of the paper version's <c>run_stage2</c> (v2.0.0 <c>utils/helpers.py</c>).</summary>
public sealed record PaperOptions
{
    public int Steps { get; init; } = 50;
    public double Strength { get; init; } = 1.0;
    public bool Tiled { get; init; }
    /// <summary>Pixels (latent tiles of size / 8).</summary>
    public int TileSize { get; init; } = 512;
    public int TileStride { get; init; } = 256;
    public string PosPrompt { get; init; } = "";
    public string NegPrompt { get; init; } = "low quality, blurry, low-resolution, noisy, unsharp, weird textures";
    public double CfgScale { get; init; } = 4.0;
    /// <summary>Start from q_sample(vae_encode(low-frequency part of the condition), t = 999) instead of pure noise.</summary>
    public bool BetterStart { get; init; }
    /// <summary>Restoration guidance (the paper's latent image guidance); refused with tiles, as officially.</summary>
    public RestorationGuidance? Guidance { get; init; }
}

/// <summary>Per-step record of the paper sampler: CFG ε, x̂₀, guided x̂₀ (when guidance applied) and the next state.</summary>
public sealed record PaperStep(Tensor Eps, Tensor PredX0, Tensor? PredX0Guided, Tensor X);

/// <summary>
/// The paper version of the pipeline (DiffBIR v2.0.0 <c>utils/helpers.py</c>): pad the stage-1 output to 64,
/// conditions (optionally with the v2.0.0 tiled VAE encoder: gaussian-blended latent tiles), better start, spaced
/// sampling with restoration guidance on x̂₀, (tiled) decode, crop; <see cref="Run"/> adds stage 1 and the colour fix.
/// Every random draw comes from one noise source in the official order.
/// </summary>
public sealed class PaperPipeline
{
    public Cleaner Cleaner { get; }
    public ControlLDM Cldm { get; }
    public NoiseSchedule Schedule { get; } = NoiseSchedule.V2;

    public PaperPipeline(Cleaner cleaner, ControlLDM cldm) { Cleaner = cleaner; Cldm = cldm; }

    /// <summary>v2.0.0 <c>vae_encode_tiled</c>: latent tiles of size/8 every stride/8, each encoded alone (posterior
    /// mode, or a sample per tile), blended with the gaussian weights.</summary>
    public Tensor VaeEncodeTiled(Tensor image, int tileSize, int tileStride, INoiseSource? sampleNoise)
    {
        using var scope = torch.NewDisposeScope();
        long bs = image.shape[0], h = image.shape[2] / 8, w = image.shape[3] / 8;
        var z = torch.zeros(new[] { bs, 4L, h, w });
        var count = torch.zeros_like(z);
        var weights = Tiling.GaussianWeightsTensor(tileSize / 8, tileSize / 8);
        foreach (var t in Tiling.SlidingWindows((int)h, (int)w, tileSize / 8, tileStride / 8))
        {
            var tile = image[.., .., (t.Top * 8)..(t.Bottom * 8), (t.Left * 8)..(t.Right * 8)];
            var zt = sampleNoise is null ? Cldm.VaeEncode(tile) : EncodeSampled(tile, sampleNoise);
            z[.., .., t.Top..t.Bottom, t.Left..t.Right].add_(zt * weights);
            count[.., .., t.Top..t.Bottom, t.Left..t.Right].add_(weights);
        }
        return z.div_(count).MoveToOuterDisposeScope();
    }

    /// <summary>v2.0.0 <c>vae_decode_tiled</c> (tile sizes in latent pixels).</summary>
    public Tensor VaeDecodeTiled(Tensor z, int tileSize, int tileStride)
    {
        using var scope = torch.NewDisposeScope();
        long bs = z.shape[0], h = z.shape[2], w = z.shape[3];
        var image = torch.zeros(new[] { bs, 3L, h * 8, w * 8 });
        var count = torch.zeros_like(image);
        var weights = Tiling.GaussianWeightsTensor(tileSize * 8, tileSize * 8);
        foreach (var t in Tiling.SlidingWindows((int)h, (int)w, tileSize, tileStride))
        {
            var dec = Cldm.VaeDecode(z[.., .., t.Top..t.Bottom, t.Left..t.Right]);
            image[.., .., (t.Top * 8)..(t.Bottom * 8), (t.Left * 8)..(t.Right * 8)].add_(dec * weights);
            count[.., .., (t.Top * 8)..(t.Bottom * 8), (t.Left * 8)..(t.Right * 8)].add_(weights);
        }
        return image.div_(count).MoveToOuterDisposeScope();
    }

    /// <summary>v2.0.0 <c>vae_encode(sample=True)</c>: a posterior sample, its ε drawn from <paramref name="noise"/>.</summary>
    public Tensor EncodeSampled(Tensor image, INoiseSource noise)
    {
        using var scope = torch.NewDisposeScope();
        using var like = torch.empty(new[] { image.shape[0], (long)Cldm.Config.Vae.EmbedDim, image.shape[2] / 8, image.shape[3] / 8 });
        // the official code draws after the encoder ran; only the order among draws matters
        var eps = noise.Next(like);
        return Cldm.VaeEncode(image, eps).MoveToOuterDisposeScope();
    }

    /// <summary>v2.0.0 <c>run_stage2</c>: decoded sample [N, 3, H, W] (cropped) and the per-step records.</summary>
    public (Tensor Sample, IReadOnlyList<PaperStep> Steps) RunStage2(Tensor clean, PaperOptions o, INoiseSource noise)
    {
        using var scope = torch.NewDisposeScope();
        long bs = clean.shape[0], h0 = clean.shape[2], w0 = clean.shape[3];
        var pad = ImageOps.PadToMultiplesOf(clean, 64);
        long h = pad.shape[2], w = pad.shape[3];
        var pos = Enumerable.Repeat(o.PosPrompt, (int)bs).ToArray();
        var neg = Enumerable.Repeat(o.NegPrompt, (int)bs).ToArray();
        var scaled = pad * 2 - 1;
        var cImg = o.Tiled ? VaeEncodeTiled(scaled, o.TileSize, o.TileStride, null) : Cldm.VaeEncode(scaled);
        var scales = Conditioning.Strength(o.Strength);
        var cond = new Conditioning(Cldm.clip.Encode(pos), cImg, scales);
        var uncond = new Conditioning(Cldm.clip.Encode(neg), cImg, scales);
        Tensor xT;
        if (o.BetterStart)
        {
            var (_, low) = ImageOps.WaveletDecomposition(pad);
            var x0 = o.Tiled ? VaeEncodeTiled(low, o.TileSize, o.TileStride, noise) : EncodeSampled(low, noise);
            var t = torch.full(new[] { bs }, Schedule.Timesteps - 1, ScalarType.Int64);
            xT = Schedule.QSample(x0, t, noise.Next(x0));
        }
        else
        {
            using var like = torch.empty(new[] { bs, 4L, h / 8, w / 8 });
            xT = noise.Next(like);
        }
        Guide? guide = null;
        if (o.Guidance is not null)
        {
            if (o.Tiled) throw new NotSupportedException("tiled sampling currently doesn't support guidance (official AssertionError)");
            guide = new Guide(o.Guidance, scaled)
            {
                Decode = z => Cldm.VaeDecode(z),
                EncodeTarget = target => EncodeSampled(target, noise),
            };
        }
        IDenoiser model = o.Tiled ? new TiledDenoiser(Cldm, o.TileSize / 8, o.TileStride / 8) : Cldm;
        var cfg = new CfgDenoiser(model, cond, uncond);
        var sampler = Samplers.Create("spaced", Schedule, new SamplerOptions(CfgScale: o.CfgScale));
        var steps = new List<PaperStep>();
        Tensor z;
        using (var run = sampler.Start(xT, o.Steps, noise))
        {
            while (!run.IsDone)
            {
                using var stepScope = torch.NewDisposeScope();
                var req = run.Request!;
                var eps = cfg.Predict(req);
                var x0 = req.ToX0(eps);
                Tensor? guided = null;
                if (guide is not null)
                {
                    var g = guide.Apply(x0, req.Timestep, req.X0Coefficient);
                    if (g.Applied) guided = g.X0;
                }
                run.Step(eps, guided);
                var next = run.IsDone ? run.Result! : run.Request!.State;
                steps.Add(new PaperStep(eps.clone(), x0.clone(), guided?.clone(), next.clone()));
                foreach (var s in new[] { steps[^1].Eps, steps[^1].PredX0, steps[^1].PredX0Guided, steps[^1].X })
                    s?.MoveToOuterDisposeScope();
            }
            z = run.Result!;
        }
        var x = o.Tiled ? VaeDecodeTiled(z, o.TileSize / 8, o.TileStride / 8) : Cldm.VaeDecode(z);
        z.Dispose();
        var sample = x[.., .., ..(int)h0, ..(int)w0];
        sample.MoveToOuterDisposeScope();
        foreach (var s in steps) foreach (var t in new[] { s.Eps, s.PredX0, s.PredX0Guided, s.X }) t?.MoveToOuterDisposeScope();
        return (sample, steps);
    }

    /// <summary>v2.0.0 <c>Pipeline.run</c> after stage 2: colour fix against the stage-1 output, resize to the final size,
    /// ×255 as float NHWC (before the uint8 conversion).</summary>
    public static Tensor FinalFloat(Tensor sample, Tensor clean, long outH, long outW)
    {
        using var scope = torch.NewDisposeScope();
        var fixedColours = ImageOps.WaveletReconstruction((sample + 1) / 2, clean);
        return (ImageOps.ResizeBicubic(fixedColours, outH, outW) * 255.0f).permute(0, 2, 3, 1).contiguous().MoveToOuterDisposeScope();
    }

    /// <summary>The whole v2.0.0 <c>Pipeline.run</c>: stage 1 (untiled), stage 2, colour fix, resize, uint8 by truncation.</summary>
    public (Tensor Image, Tensor Stage1, IReadOnlyList<PaperStep> Steps) Run(Tensor lqUint8Nhwc, PaperOptions o, INoiseSource noise)
    {
        using var _ng = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var lq = lqUint8Nhwc.to(ScalarType.Float64).div(255.0).clamp(0, 1).to(ScalarType.Float32).permute(0, 3, 1, 2).contiguous();
        var (oh, ow) = Cleaner.OutputSize(lq.shape[2], lq.shape[3]);
        var clean = Cleaner.Apply(lq, false, 0, 0);
        var (sample, steps) = RunStage2(clean, o, noise);
        var img = FinalFloat(sample, clean, oh, ow).clamp(0, 255).to(ScalarType.Byte);
        img.MoveToOuterDisposeScope(); clean.MoveToOuterDisposeScope();
        foreach (var s in steps) foreach (var t in new[] { s.Eps, s.PredX0, s.PredX0Guided, s.X }) t?.MoveToOuterDisposeScope();
        return (img, clean, steps);
    }
}
