using System.Diagnostics;
using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Data;
using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Models;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Pipeline;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>Steps, batch, crop and learning rate of one stage of the tiny recipe.</summary>
/// <param name="Crop">training crop side in px (a multiple of 8, at most the image size)</param>
public sealed record TinyStage(int Steps, int Batch, int Crop, double LearningRate);

/// <summary>
/// Settings of <see cref="TinyRecipe.Train"/>. The defaults are the recipe whose weights are committed in
/// weights/tiny (about 10 minutes with 1 thread on this 2-core machine while it was shared).
/// </summary>
public sealed record TinyRecipeOptions
{
    public long Seed { get; init; } = 2026;
    /// <summary>torch intra-op threads (fixed for the run: results depend on it).</summary>
    public int Threads { get; init; } = 1;
    /// <summary>Training images (procedural indices 0 … N − 1) and their size.</summary>
    public int Images { get; init; } = 512;
    public int ImageSize { get; init; } = 128;
    /// <summary>64-px crops: the VAE's middle attention then sees 8×8 latents (16×16 at inference); 32-px crops (4×4)
    /// generalised badly to whole images.</summary>
    public TinyStage Vae { get; init; } = new(1500, 4, 64, 3e-4);
    /// <summary>Whole 128-px images (16×16 latents, the inference size) for the attention of the prior and the ControlNet.
    /// Batch 16: on one CPU thread a step of 16 costs about 2.6 steps of 4 (small tensors: per-op overhead dominates).</summary>
    public TinyStage Prior { get; init; } = new(800, 16, 128, 1e-3);
    public TinyStage Stage1 { get; init; } = new(1500, 4, 64, 1e-3);
    /// <summary>Batch 8 of whole images at 3·10⁻³ (pilots on the same frozen networks, 600 steps: 21.7 dB at 3·10⁻³ vs
    /// 20.9 dB at 10⁻³; biasing t toward T did not help).</summary>
    public TinyStage Stage2 { get; init; } = new(800, 8, 128, 3e-3);
    /// <summary>Every stage's learning rate falls linearly to zero over this last fraction of its steps (constant
    /// before): at a constant rate the networks hover, and the decay settles them (0: constant throughout).</summary>
    public double DecayFraction { get; init; } = 0.3;
    /// <summary>Log the mean loss every this many steps.</summary>
    public int LogEvery { get; init; } = 100;
    /// <summary>Diffusion schedule of the prior and the IRControlNet: "v2.1" (zero terminal SNR, v-prediction, as the
    /// official HEAD; the EDM samplers need it, see docs/tiny-preset.md) or "v2" (linear-sqrt β, ε-prediction).</summary>
    public string Schedule { get; init; } = "v2.1";
    /// <summary>Stop after this stage ("vae", "prior", "stage1"; null: all) — pilots; nothing is written but the log.</summary>
    public string? StopAfter { get; init; }
    /// <summary>Pixel-unshuffle factor = upscale factor of the stage-1 SwinIR (8 as the released v1 SwinIR; smaller keeps
    /// more of the input per token: 12 or 48 input channels instead of 192 for the 32-channel embedding).</summary>
    public int Stage1Scale { get; init; } = 2;
    /// <summary>Held-out images measured after the VAE (round-trip PSNR) and after stage 1 (PSNR vs the LQ input).</summary>
    public int HeldOutChecks { get; init; } = 8;

    /// <summary>The recipe with <paramref name="steps"/> steps per stage on <paramref name="images"/> images (tests, smoke runs).</summary>
    public static TinyRecipeOptions Short(int steps, int images = 8, long seed = 2026)
    {
        var d = new TinyRecipeOptions();
        return d with
        {
            Seed = seed, Images = images, LogEvery = Math.Max(1, Math.Min(steps, 10)),
            Vae = d.Vae with { Steps = steps, Batch = 2 }, Prior = d.Prior with { Steps = steps, Batch = 2 },
            Stage1 = d.Stage1 with { Steps = steps, Batch = 2 }, Stage2 = d.Stage2 with { Steps = steps, Batch = 2 }, HeldOutChecks = 1,
        };
    }
}

/// <summary>What <see cref="TinyRecipe.Train"/> wrote and measured.</summary>
public sealed record TinyRecipeResult(IReadOnlyDictionary<string, string> Sha256, IReadOnlyDictionary<string, double> FinalLosses,
    double LatentScaleFactor, double WallSeconds, string RecipePath);

/// <summary>
/// The recipe of the trained tiny DiffBIR (preset <c>tiny</c>), made entirely by this project's training code on a
/// CPU: (1) the KL-f8 VAE (<see cref="VaeTrainer"/>) on procedural images; its latent scale factor = 1 / std of the
/// posterior means (the LDM convention); (2) the UNet as an ε-prediction latent diffusion prior with the v2 schedule
/// (<see cref="PriorTrainer"/>), empty prompt through the frozen CLIP; (3) stage 1, a small SwinIR, on Eq. 2 pairs
/// (<see cref="Stage1Trainer"/>); (4) the IRControlNet initialised from the UNet (<see cref="Stage2Trainer"/>).
/// The tiny CLIP text encoder is never trained: its weights are regenerated at load time from
/// <see cref="ClipSeed"/> (deterministic on the CPU), so its 49408×32 token table (6.3 MB) is not committed.
/// Same options (seed, threads) on the same machine → byte-identical safetensors.
/// </summary>
public static class TinyRecipe
{
    /// <summary>Seed of the frozen random CLIP (Presets.RandomInit), shared by training and the preset.</summary>
    public const long ClipSeed = 77;
    /// <summary>The prompt the tiny model is trained with (and the preset's default): it has no text conditioning.</summary>
    public const string Prompt = "";
    public const string RecipeFile = "recipe.json";
    public static readonly string[] WeightFiles = { "vae.safetensors", "unet.safetensors", "controlnet.safetensors", "stage1.safetensors" };

    /// <summary>The stage-1 network of the trained tiny model: SwinIR as the released v1 one (pixel-unshuffle 8,
    /// nearest+conv upsampler), 32 channels, 2 stages of 2 blocks, no DropPath.</summary>
    public static SwinIRConfig Stage1Config { get; } = Stage1ConfigFor(8);

    /// <summary>The tiny stage-1 SwinIR with pixel-unshuffle (and upscale) factor <paramref name="scale"/> (2, 4 or 8).</summary>
    /// img_size 16 keeps the attention-mask buffers small (they are saved; other sizes compute their mask at run time).
    public static SwinIRConfig Stage1ConfigFor(int scale) => new(ImgSize: 16, EmbedDim: 32, Depths: new[] { 2, 2 }, NumHeads: new[] { 2, 2 },
        WindowSize: 8, MlpRatio: 2, Sf: scale, Upsampler: "nearest+conv", Unshuffle: true, UnshuffleScale: scale, DropPathRate: 0);

    /// <summary>A SwinIR config as the official constructor arguments (what <see cref="SwinIRConfig.FromJson"/> reads).</summary>
    public static JsonObject Stage1Json(SwinIRConfig c) => new()
    {
        ["img_size"] = c.ImgSize, ["patch_size"] = c.PatchSize, ["in_chans"] = c.InChans, ["embed_dim"] = c.EmbedDim,
        ["depths"] = new JsonArray(c.Depths.Select(d => (JsonNode?)d).ToArray()), ["num_heads"] = new JsonArray(c.NumHeads.Select(d => (JsonNode?)d).ToArray()),
        ["window_size"] = c.WindowSize, ["mlp_ratio"] = c.MlpRatio, ["sf"] = c.Sf, ["img_range"] = c.ImgRange, ["upsampler"] = c.Upsampler,
        ["resi_connection"] = c.ResiConnection, ["unshuffle"] = c.Unshuffle, ["unshuffle_scale"] = c.UnshuffleScale, ["drop_path_rate"] = c.DropPathRate,
    };

    /// <summary>
    /// The ControlLDM of the trained tiny model: the fixtures' tiny config (UNet/ControlNet 32 ch, channel_mult [1, 2];
    /// CLIP 3 layers × 32) with a VAE of 32 channels at every level (ch_mult [1, 1, 1, 1]: the weights must fit 5 MB)
    /// and its own latent scale.
    /// </summary>
    public static ControlLdmConfig CldmConfig(double latentScaleFactor) =>
        ControlLdmConfig.FromJson(JsonNode.Parse(CldmJson)!) with { LatentScaleFactor = latentScaleFactor };

    /// <summary>The architecture as a config JSON (latent_scale_factor left at SD's; recipe.json has the trained one).</summary>
    public static string CldmJson { get; } = Presets.TinyCldmJson.Replace("\"ch_mult\": [1, 1, 2, 2]", "\"ch_mult\": [1, 1, 1, 1]", StringComparison.Ordinal)
        .Replace("\"dropout\": 0.0}", "\"dropout\": 0.0, \"norm_num_groups\": 8, \"norm_out\": false}", StringComparison.Ordinal);

    /// <summary>The tiny ControlLDM with the frozen random CLIP (byte-level tokenizer: the empty prompt needs no vocabulary).</summary>
    public static ControlLDM NewCldm(double latentScaleFactor, Models.StableDiffusion.ControlMode mode = Models.StableDiffusion.ControlMode.Add,
        JsonNode? config = null)
    {
        var cfg = config is null ? CldmConfig(latentScaleFactor) : ControlLdmConfig.FromJson(config) with { LatentScaleFactor = latentScaleFactor };
        var cldm = new ControlLDM(cfg with { Mode = mode }, ClipTokenizer.ByteLevel());
        Presets.RandomInit(cldm.clip, ClipSeed);
        return cldm;
    }

    /// <summary>
    /// Initialisation for training from scratch with an explicit generator (not torch's global one, so that a run
    /// does not depend on what else the process draws): conv and linear weights and biases U(±1/√fan_in) (torch's
    /// default), norm layers weight 1 and bias 0 (TorchSharp leaves GroupNorm uninitialised), and parameters that
    /// are all zero after construction (zero_module: UNet out convs, proj_out, ControlNet zero convs) stay zero.
    /// </summary>
    public static void InitFromScratch(nn.Module module, long seed)
    {
        using var gen = new Generator((ulong)seed, CPU);
        using var _ = no_grad();
        foreach (var (_, m) in module.named_modules())
        {
            var own = m.named_parameters(recurse: false).ToList();
            if (own.Count == 0) continue;
            bool norm = m is GroupNorm or LayerNorm || m.GetType().Name.Contains("Norm", StringComparison.Ordinal);
            var weight = own.FirstOrDefault(p => p.name == "weight").parameter;
            long fanIn = weight is not null && weight.dim() >= 2 ? weight.shape.Skip(1).Aggregate(1L, (a, b) => a * b) : 0;
            foreach (var (name, p) in own)
            {
                using var scope = NewDisposeScope();
                if (norm) { if (name == "weight") p.fill_(1); else if (name == "bias") p.zero_(); continue; }
                if (p.abs().max().item<float>() == 0) continue;   // zero_module: keep
                long f = p.dim() >= 2 ? p.shape.Skip(1).Aggregate(1L, (a, b) => a * b) : fanIn;
                if (f == 0)
                {
                    // Other tables (SwinIR's relative position bias, embeddings): N(0, 0.02²) as trunc_normal_(std=.02).
                    p.copy_(randn(p.shape, ScalarType.Float32, CPU, generator: gen).mul(0.02).to(p.dtype));
                    continue;
                }
                double bound = 1 / Math.Sqrt(f);
                p.copy_(rand(p.shape, ScalarType.Float32, CPU, generator: gen).mul(2 * bound).sub(bound).to(p.dtype));
            }
        }
    }

    /// <summary>
    /// Starts the VAE as the 8×8 block-mean codec written into the official layout (round trip of the held-out images
    /// 23.8 dB before any step), so that training only has to add detail. From torch's random initialisation the tiny
    /// VAE spent hundreds of steps on a grey plateau (15 dB, below the 17 dB of a flat image of the mean colour): colour
    /// has to cross a dozen random layers. Here:
    /// <list type="bullet">
    /// <item>the main path carries the image in six channels, +x in 0–2 and −x in 3–5, so the swish before each
    /// <c>conv_out</c> is undone exactly (swish(u) − swish(−u) = u) — which needs <c>"norm_out": false</c>, as the tiny
    /// config has;</item>
    /// <item>encoder: <c>conv_in</c> copies (±), each <c>downsample</c> averages its 2×2 block (the official pad (0, 1, 0, 1)
    /// and stride 2 make that exact), <c>conv_out</c> gives μ = the block means in latent channels 0–2; latent channel 3
    /// and log σ² start with zero weights, log σ² at −6 (σ ≈ 0.05: a few hundred steps are not spent learning to ignore
    /// unit-variance noise; the small KL then keeps σ in check);</item>
    /// <item>decoder: <c>conv_in</c> copies (±), each <c>upsample</c> conv passes its nearest-upsampled input through,
    /// <c>conv_out</c> takes the difference;</item>
    /// <item>every residual branch (<c>conv2</c>) and the attention's <c>proj_out</c> start at zero, so every block is the
    /// identity at step 0; the other 26 channels of each main-path conv keep their random rows.</item>
    /// </list>
    /// </summary>
    public static void InitVaeAsBlockMeans(Models.Vae.AutoencoderKL vae)
    {
        var dd = vae.Config.DdConfig;
        if (dd.NormOut || dd.ZChannels < 3 || dd.Ch * dd.ChMult.Min() < 6 || dd.InChannels != 3 || dd.OutCh != 3)
            throw new ArgumentException("the block-mean initialisation needs norm_out: false, 3 image channels, ≥ 3 latent channels and ≥ 6 channels per level");
        using var _ = no_grad();
        var p = vae.named_parameters().ToDictionary(kv => kv.name, kv => kv.parameter);
        foreach (var (name, t) in p)
            if (name.Contains(".conv2.", StringComparison.Ordinal) || name.Contains(".proj_out.", StringComparison.Ordinal)) t.zero_();
        void Rows(string conv, Action<Tensor, int> set)
        {
            var w = p[conv + ".weight"]; var b = p[conv + ".bias"];
            for (int c = 0; c < 6; c++) { w[c].zero_(); set(w[c], c); b[c].fill_(0); }
        }
        void Split(Tensor wc, int c) => wc[c % 3, 1, 1].fill_(c < 3 ? 1.0 : -1.0);
        Rows("encoder.conv_in", Split);
        foreach (var conv in p.Keys.Where(k => k.EndsWith(".downsample.conv.weight", StringComparison.Ordinal)).Select(k => k[..^".weight".Length]).ToList())
            Rows(conv, (wc, c) => { wc[c, 0, 0].fill_(0.25); wc[c, 0, 1].fill_(0.25); wc[c, 1, 0].fill_(0.25); wc[c, 1, 1].fill_(0.25); });
        var eo = p["encoder.conv_out.weight"]; var eb = p["encoder.conv_out.bias"];
        long z = dd.ZChannels;
        for (long c = 0; c < eo.shape[0]; c++)
        {
            if (c >= 3 && c < z) continue;                         // free latent channels: random rows
            eo[c].zero_(); eb[c].fill_(c < 3 ? 0.0 : -6.0);        // log σ² rows (c ≥ z): σ ≈ 0.05
            if (c < 3) { eo[c, c, 1, 1].fill_(1.0); eo[c, c + 3, 1, 1].fill_(-1.0); }
        }
        var q = p["quant_conv.weight"]; var qb = p["quant_conv.bias"];
        q.zero_(); qb.zero_();
        for (long c = 0; c < q.shape[0]; c++) q[c, c, 0, 0].fill_(1.0);
        var pq = p["post_quant_conv.weight"]; pq.zero_(); p["post_quant_conv.bias"].zero_();
        for (long c = 0; c < pq.shape[0]; c++) pq[c, c, 0, 0].fill_(1.0);
        Rows("decoder.conv_in", Split);
        foreach (var conv in p.Keys.Where(k => k.EndsWith(".upsample.conv.weight", StringComparison.Ordinal)).Select(k => k[..^".weight".Length]).ToList())
            Rows(conv, (wc, c) => wc[c, 1, 1].fill_(1.0));
        var dw = p["decoder.conv_out.weight"]; dw.zero_(); p["decoder.conv_out.bias"].zero_();
        for (int c = 0; c < 3; c++) { dw[c, c, 1, 1].fill_(1.0); dw[c, c + 3, 1, 1].fill_(-1.0); }
    }

    /// <summary>Runs the whole recipe and writes weights and recipe.json into <paramref name="outDir"/>.</summary>
    public static TinyRecipeResult Train(string outDir, TinyRecipeOptions? options = null, Action<string>? log = null, CancellationToken ct = default)
    {
        var o = options ?? new TinyRecipeOptions();
        log ??= _ => { };
        if (o.Threads < 1) throw new ArgumentOutOfRangeException(nameof(options), o.Threads, "threads must be ≥ 1");
        torch.set_num_threads(o.Threads);
        var wall = Stopwatch.StartNew();
        var stageSeconds = new Dictionary<string, double>();
        var finals = new Dictionary<string, double>();
        Directory.CreateDirectory(outDir);

        using var data = new TinyTrainingData(o.Seed, o.Images, o.ImageSize, log);
        stageSeconds["data"] = wall.Elapsed.TotalSeconds;
        log($"data: {o.Images} procedural images of {o.ImageSize} px with Eq. 2 LQ versions ({stageSeconds["data"]:F0} s)");

        using var draws = new SeededTrainingDraws(o.Seed + 1);
        var schedule = ScheduleOf(o.Schedule);
        var heldOut = new JsonObject();
        var cldm = NewCldm(1.0);
        InitFromScratch(cldm.vae, o.Seed + 10);
        InitVaeAsBlockMeans(cldm.vae);
        InitFromScratch(cldm.unet, o.Seed + 11);
        var stage1 = new SwinIR(Stage1ConfigFor(o.Stage1Scale));
        InitFromScratch(stage1, o.Seed + 12);

        // (1) VAE.
        {
            var sw = Stopwatch.StartNew();
            using var opt = VaeTrainer.CreateOptimizer(cldm.vae, o.Vae.LearningRate);
            var window = new List<double>();
            for (int step = 1; step <= o.Vae.Steps; step++)
            {
                ct.ThrowIfCancellationRequested();
                using var scope = NewDisposeScope();
                SetLearningRate(opt, o.Vae.LearningRate * DecayFactor(step, o.Vae.Steps, o.DecayFraction));
                var (hq, _) = data.Sample(o.Vae.Batch, o.Vae.Crop);
                var l = VaeTrainer.Step(cldm.vae, hq * 2 - 1, opt, draws);
                window.Add(l.Loss);
                if (step % o.LogEvery == 0 || step == o.Vae.Steps)
                {
                    log(Invariant($"vae    step {step,5}/{o.Vae.Steps}: loss {window.Average():F5} (last: L1 {l.L1:F4}, MSE {l.Mse:F5}, KL {l.Kl:F3}) {sw.Elapsed.TotalSeconds:F0} s"));
                    finals["vae"] = window.Average(); window.Clear();
                }
            }
            stageSeconds["vae"] = sw.Elapsed.TotalSeconds;
        }
        cldm.vae.eval();
        foreach (var p in cldm.vae.parameters()) p.requires_grad = false;
        if (o.HeldOutChecks > 0)
        {
            double psnr = VaeRoundTripPsnr(cldm.vae, o.Seed, o.HeldOutChecks, o.ImageSize);
            heldOut["vae_round_trip_psnr"] = Math.Round(psnr, 2);
            log(Invariant($"vae    held-out round trip (posterior mode, {o.HeldOutChecks} images of {o.ImageSize} px): PSNR {psnr:F2} dB"));
        }
        if (o.StopAfter == "vae") { cldm.Dispose(); stage1.Dispose(); return Stopped(o, finals, heldOut, wall); }

        // Latent scale: 1 / std of the posterior means of the training images (LDM's scale_by_std), 4 significant digits.
        var (means, stds) = HqPosteriors(cldm.vae, data, 32);
        double latentStd = means.std().item<float>();
        double scale = double.Parse((1 / latentStd).ToString("G4", CultureInfo.InvariantCulture), CultureInfo.InvariantCulture);
        log(Invariant($"latent scale factor 1/std = {scale}"));
        // The ControlLDM's config carries the scale (VaeEncode/VaeDecode use it): rebuild around the trained VAE.
        var trained = NewCldm(scale);
        CopyInto(trained.vae, cldm.vae);
        CopyInto(trained.unet, cldm.unet);
        cldm.Dispose();
        cldm = trained;
        cldm.vae.eval();
        foreach (var p in cldm.vae.parameters()) p.requires_grad = false;
        foreach (var p in cldm.clip.parameters()) p.requires_grad = false;
        cldm.clip.eval();
        Tensor context;
        using (no_grad()) context = cldm.clip.Encode(new[] { Prompt });

        // (2) The UNet prior on latents of whole images (posterior samples).
        {
            var sw = Stopwatch.StartNew();
            using var opt = PriorTrainer.CreateOptimizer(cldm.unet, o.Prior.LearningRate);
            var window = new List<double>();
            int cells = (o.ImageSize - o.Prior.Crop) / 8 + 1, lc = o.Prior.Crop / 8;
            for (int step = 1; step <= o.Prior.Steps; step++)
            {
                ct.ThrowIfCancellationRequested();
                using var scope = NewDisposeScope();
                SetLearningRate(opt, o.Prior.LearningRate * DecayFactor(step, o.Prior.Steps, o.DecayFraction));
                var idx = data.SampleIndices(o.Prior.Batch);
                using var it = tensor(idx);
                var mu = means.index_select(0, it);
                var sd = stds.index_select(0, it);
                var eps = draws.Randn(mu.shape, ScalarType.Float32, CPU, "prior_posterior_noise");
                var z = (mu + sd * eps) * scale;
                if (cells > 1)
                {
                    // Aligned latent crops (the latent of a crop ≈ the crop of the latent away from the borders).
                    var offs = data.SampleIndices(2).Select(v => (v % cells)).ToArray();
                    z = z[.., .., TensorIndex.Slice(offs[0], offs[0] + lc), TensorIndex.Slice(offs[1], offs[1] + lc)];
                }
                window.Add(PriorTrainer.Step(cldm.unet, schedule, z, context, opt, draws));
                if (step % o.LogEvery == 0 || step == o.Prior.Steps)
                {
                    log(Invariant($"prior  step {step,5}/{o.Prior.Steps}: loss {window.Average():F5} {sw.Elapsed.TotalSeconds:F0} s"));
                    finals["prior"] = window.Average(); window.Clear();
                }
            }
            stageSeconds["prior"] = sw.Elapsed.TotalSeconds;
        }
        means.Dispose(); stds.Dispose();
        if (o.StopAfter == "prior") { cldm.Dispose(); stage1.Dispose(); return Stopped(o, finals, heldOut, wall); }

        // (3) Stage 1 on Eq. 2 pairs.
        {
            var sw = Stopwatch.StartNew();
            using var opt = Stage1Trainer.CreateOptimizer(stage1, o.Stage1.LearningRate);
            var window = new List<double>();
            for (int step = 1; step <= o.Stage1.Steps; step++)
            {
                ct.ThrowIfCancellationRequested();
                using var scope = NewDisposeScope();
                SetLearningRate(opt, o.Stage1.LearningRate * DecayFactor(step, o.Stage1.Steps, o.DecayFraction));
                var (hq, lq) = data.Sample(o.Stage1.Batch, o.Stage1.Crop);
                using var r = Stage1Trainer.Step(stage1, (hq * 2 - 1).permute(0, 2, 3, 1), lq.permute(0, 2, 3, 1), opt, draws);
                // Report the mean squared error per pixel (the official loss is its sum).
                window.Add(r.Loss.item<float>() / hq.numel());
                if (step % o.LogEvery == 0 || step == o.Stage1.Steps)
                {
                    log(Invariant($"stage1 step {step,5}/{o.Stage1.Steps}: MSE/pixel {window.Average():F5} {sw.Elapsed.TotalSeconds:F0} s"));
                    finals["stage1"] = window.Average(); window.Clear();
                }
            }
            stageSeconds["stage1"] = sw.Elapsed.TotalSeconds;
        }
        stage1.eval();
        foreach (var p in stage1.parameters()) p.requires_grad = false;
        if (o.HeldOutChecks > 0)
        {
            var (s1, lqPsnr) = Stage1Psnr(stage1, o.Seed, o.HeldOutChecks, o.ImageSize);
            heldOut["stage1_psnr"] = Math.Round(s1, 2);
            heldOut["lq_psnr"] = Math.Round(lqPsnr, 2);
            log(Invariant($"stage1 held-out ({o.HeldOutChecks} images): PSNR {s1:F2} dB (LQ input {lqPsnr:F2} dB)"));
        }
        if (o.StopAfter == "stage1") { cldm.Dispose(); stage1.Dispose(); return Stopped(o, finals, heldOut, wall); }

        // (4) IRControlNet from the UNet. The frozen networks are first rounded to what is committed (float16), so the
        // ControlNet learns against the networks it will run with; the crop sampler and the draws restart from their
        // own seed, so that `weights train-tiny --variants` can train Variants 5 and 6 on the same batches from the
        // committed files alone.
        RoundToFloat16(cldm.vae); RoundToFloat16(cldm.unet); RoundToFloat16(stage1);
        {
            var sw = Stopwatch.StartNew();
            data.RestartSampler();
            using var draws2 = new SeededTrainingDraws(Stage2DrawsSeed(o.Seed));
            finals["stage2"] = TrainControlNet(cldm, stage1, schedule, data, draws2, o.Stage2, o.DecayFraction, o.LogEvery, "stage2", log, ct);
            stageSeconds["stage2"] = sw.Elapsed.TotalSeconds;
        }
        context.Dispose();

        // Weights (official key names per component) and the recipe.
        var modules = new (string File, nn.Module Module)[]
        {
            ("vae.safetensors", cldm.vae), ("unet.safetensors", cldm.unet), ("controlnet.safetensors", cldm.controlnet), ("stage1.safetensors", stage1),
        };
        var sha = new Dictionary<string, string>();
        foreach (var (file, module) in modules)
        {
            var path = Path.Combine(outDir, file);
            SaveFloat16(module, path, new Dictionary<string, string> { ["producer"] = "DiffBIR.Lab tiny recipe", ["seed"] = o.Seed.ToString(CultureInfo.InvariantCulture) });
            sha[file] = Sha256(path);
        }
        wall.Stop();
        var recipePath = Path.Combine(outDir, RecipeFile);
        AtomicFile.WriteAllText(recipePath, RecipeJson(o, scale, sha, finals, stageSeconds, heldOut, wall.Elapsed.TotalSeconds).ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        cldm.Dispose(); stage1.Dispose();
        log(Invariant($"done in {wall.Elapsed.TotalSeconds:F0} s: {string.Join(", ", sha.Select(kv => $"{kv.Key} {kv.Value[..12]}"))}"));
        return new TinyRecipeResult(sha, finals, scale, wall.Elapsed.TotalSeconds, recipePath);
    }

    /// <summary>Learning-rate factor of step <paramref name="step"/> (1-based) of <paramref name="steps"/>: 1, then a
    /// linear fall over the last <paramref name="fraction"/> of the steps to 1/n of the rate at the last step.</summary>
    public static double DecayFactor(int step, int steps, double fraction)
    {
        int n = (int)Math.Round(steps * Math.Clamp(fraction, 0, 1));
        int first = steps - n + 1;                                   // the first decaying step
        return n == 0 || step < first ? 1.0 : (double)(steps - step + 1) / (n + 1);
    }

    static void SetLearningRate(optim.Optimizer opt, double lr)
    {
        foreach (var g in opt.ParamGroups) g.LearningRate = lr;
    }

    /// <summary>Seed of the stage-2 draws (shared by the recipe's IRControlNet and the variants).</summary>
    public static long Stage2DrawsSeed(long seed) => seed + 4;

    /// <summary>Rounds every float parameter and buffer to float16 precision in place (what SaveFloat16 stores).</summary>
    public static void RoundToFloat16(nn.Module module)
    {
        using var _ = no_grad();
        foreach (var (_, t) in module.state_dict())
            if (t.is_floating_point()) { using var h = t.to(ScalarType.Float16).to(t.dtype); t.copy_(h); }
    }

    /// <summary>
    /// Stage 2 of the recipe: the ControlNet of <paramref name="cldm"/> (IRControlNet or a variant, by its config's mode)
    /// starts from the UNet (<c>load_controlnet_from_unet</c>) and learns with the official loss on (HQ, stage1(LQ))
    /// pairs, empty prompt, no noise augmentation. The frozen parts are computed once per training image
    /// (<see cref="Stage2Latents"/>), then every step draws whole images (or aligned latent crops), a posterior sample
    /// of the HQ latent and runs <see cref="Stage2Trainer.StepOnLatents"/>. Returns the mean loss of the last logging window.
    /// </summary>
    public static double TrainControlNet(ControlLDM cldm, SwinIR stage1, NoiseSchedule schedule, TinyTrainingData data, ITrainingDraws draws,
        TinyStage stage, double decayFraction, int logEvery, string label, Action<string> log, CancellationToken ct = default)
    {
        var sw = Stopwatch.StartNew();
        cldm.unet.eval();
        cldm.controlnet.LoadFromUNet(cldm.unet);
        Stage2Trainer.Prepare(cldm);
        var (mean, std, cImg, cTxt) = Stage2Latents(cldm, stage1, data);
        log(Invariant($"{label} latents of {data.Count} training images ({sw.Elapsed.TotalSeconds:F0} s)"));
        using var opt = Stage2Trainer.CreateOptimizer(cldm, stage.LearningRate);
        int cells = (data.Size - stage.Crop) / 8 + 1, lc = stage.Crop / 8;
        var window = new List<double>();
        double last = double.NaN;
        for (int step = 1; step <= stage.Steps; step++)
        {
            ct.ThrowIfCancellationRequested();
            using var scope = NewDisposeScope();
            SetLearningRate(opt, stage.LearningRate * DecayFactor(step, stage.Steps, decayFraction));
            using var it = tensor(data.SampleIndices(stage.Batch));
            var mu = mean.index_select(0, it);
            var eps = draws.Randn(mu.shape, ScalarType.Float32, CPU, "posterior_noise(vae_encode(gt).sample())");
            var z0 = (mu + std.index_select(0, it) * eps) * cldm.Config.LatentScaleFactor;
            var c = cImg.index_select(0, it);
            if (cells > 1)
            {
                var offs = data.SampleIndices(2).Select(v => v % cells).ToArray();
                z0 = z0[.., .., TensorIndex.Slice(offs[0], offs[0] + lc), TensorIndex.Slice(offs[1], offs[1] + lc)];
                c = c[.., .., TensorIndex.Slice(offs[0], offs[0] + lc), TensorIndex.Slice(offs[1], offs[1] + lc)];
            }
            using var loss = Stage2Trainer.StepOnLatents(cldm, schedule, z0, c, cTxt.expand(stage.Batch, -1, -1), opt, draws);
            window.Add(loss.item<float>());
            if (step % logEvery == 0 || step == stage.Steps)
            {
                log(Invariant($"{label} step {step,5}/{stage.Steps}: loss {window.Average():F5} {sw.Elapsed.TotalSeconds:F0} s"));
                last = window.Average(); window.Clear();
            }
        }
        foreach (var t in new[] { mean, std, cImg, cTxt }) t.Dispose();
        cldm.controlnet.eval();
        return last;
    }

    /// <summary>
    /// What the frozen networks give for every training image, once: the HQ posterior's mean and standard deviation
    /// (unscaled), the condition latent c_img (VAE mode of the stage-1 output, scaled, as <c>prepare_condition</c>) and
    /// the CLIP context of the empty prompt [1, 77, C].
    /// </summary>
    public static (Tensor Mean, Tensor Std, Tensor CImg, Tensor CTxt) Stage2Latents(ControlLDM cldm, SwinIR stage1, TinyTrainingData data, int chunk = 16)
    {
        var (mean, std) = HqPosteriors(cldm.vae, data, chunk);
        using var _ = no_grad();
        stage1.eval();
        var c = new List<Tensor>();
        for (int i = 0; i < data.Count; i += chunk)
        {
            using var scope = NewDisposeScope();
            var slice = TensorIndex.Slice(i, Math.Min(i + chunk, data.Count));
            c.Add(cldm.VaeEncode(stage1.forward(data.Lq[slice]) * 2 - 1).MoveToOuterDisposeScope());
        }
        var result = (mean, std, cat(c), cldm.clip.Encode(new[] { Prompt }));
        foreach (var t in c) t.Dispose();
        return result;
    }

    /// <summary>The VAE posterior (mean, standard deviation; unscaled) of every training HQ image, encoded
    /// <paramref name="chunk"/> images at a time (the prior's scale and latents, and stage 2's latents).</summary>
    static (Tensor Mean, Tensor Std) HqPosteriors(Models.Vae.AutoencoderKL vae, TinyTrainingData data, int chunk)
    {
        using var _ = no_grad();
        var m = new List<Tensor>(); var s = new List<Tensor>();
        for (int i = 0; i < data.Count; i += chunk)
        {
            using var scope = NewDisposeScope();
            using var x = data.Hq[TensorIndex.Slice(i, Math.Min(i + chunk, data.Count))] * 2 - 1;
            using var post = vae.Encode(x);
            m.Add(post.Mean.clone().MoveToOuterDisposeScope()); s.Add(post.Std.clone().MoveToOuterDisposeScope());
        }
        var result = (cat(m), cat(s));
        foreach (var t in m.Concat(s)) t.Dispose();
        return result;
    }

    /// <summary>
    /// Reads one part of a tiny recipe.json; a damaged file (bad JSON, a missing part, a wrong type or value) becomes a
    /// <see cref="CheckpointException"/> naming the file and the part, not an internal error from the readers.
    /// </summary>
    public static T RecipePart<T>(string recipePath, string part, Func<T> read)
    {
        try { return read(); }
        catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or FormatException or ArgumentException
                                      or NullReferenceException or NotSupportedException or KeyNotFoundException)
        { throw new CheckpointException(recipePath, $"{part}: {e.Message}"); }
    }

    /// <summary>
    /// Saves a module's state dict with float parameters stored as float16 (the committed weights must fit 5 MB;
    /// the preset loads them back into float32 networks, so the model that runs is the fp16-rounded one).
    /// </summary>
    public static void SaveFloat16(nn.Module module, string path, IReadOnlyDictionary<string, string> metadata)
    {
        using var scope = NewDisposeScope();
        var sd = module.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.is_floating_point() ? kv.Value.detach().to(ScalarType.Float16).contiguous() : kv.Value.detach().contiguous());
        SafeTensors.Save(path, sd, new Dictionary<string, string>(metadata) { ["format"] = "pt" });
    }

    public static string Sha256(string path)
    {
        using var f = File.OpenRead(path);
        return Convert.ToHexString(SHA256.HashData(f)).ToLowerInvariant();
    }

    static void CopyInto(nn.Module target, nn.Module source)
    {
        using var _ = no_grad();
        var src = source.state_dict();
        foreach (var (k, v) in target.state_dict()) v.copy_(src[k]);
    }

    /// <summary>The noise schedule of a recipe's <see cref="TinyRecipeOptions.Schedule"/> name.</summary>
    public static NoiseSchedule ScheduleOf(string name) => name switch
    {
        "v2.1" => NoiseSchedule.V2_1,
        "v2" => NoiseSchedule.V2,
        _ => throw new ArgumentException($"schedule '{name}': expected v2 or v2.1"),
    };

    static TinyRecipeResult Stopped(TinyRecipeOptions o, Dictionary<string, double> finals, JsonObject heldOut, Stopwatch wall)
    {
        var all = new Dictionary<string, double>(finals);
        foreach (var (k, v) in heldOut) all["heldout_" + k] = (double)v!;
        return new TinyRecipeResult(new Dictionary<string, string>(), all, double.NaN, wall.Elapsed.TotalSeconds, "");
    }

    /// <summary>Mean PSNR (dB) of VAE round trips D(mode(E(x))) on held-out images (whole <paramref name="size"/>-px images:
    /// the size the pipeline uses, so that the mid-block attention sees the inference latent size).</summary>
    public static double VaeRoundTripPsnr(Models.Vae.AutoencoderKL vae, long dataSeed, int images, int size)
    {
        using var _ = no_grad();
        double sum = 0;
        for (int i = 0; i < images; i++)
        {
            using var scope = NewDisposeScope();
            var hq = ProceduralImages.Generate(dataSeed, TinyTrainingData.HeldOutStart + i, size).unsqueeze(0);
            using var post = vae.Encode(hq * 2 - 1);
            var rec = ((vae.Decode(post.Mode()) + 1) / 2).clamp(0, 1);
            sum += Metrics.ImageMetrics.Psnr(rec, hq).mean().item<double>();
        }
        return sum / images;
    }

    /// <summary>Mean PSNR (dB) vs HQ of stage 1 on held-out Eq. 2 LQ images, and of the LQ images themselves.</summary>
    public static (double Stage1, double Lq) Stage1Psnr(nn.Module<Tensor, Tensor> stage1, long dataSeed, int images, int size)
    {
        using var _ = no_grad();
        double s1 = 0, lqs = 0;
        for (int i = 0; i < images; i++)
        {
            using var scope = NewDisposeScope();
            long index = TinyTrainingData.HeldOutStart + i;
            var hq = ProceduralImages.Generate(dataSeed, index, size);
            var lq = TinyTrainingData.DegradeOne(hq, dataSeed, index).unsqueeze(0);
            var outp = stage1.forward(lq).clamp(0, 1);
            s1 += Metrics.ImageMetrics.Psnr(outp, hq.unsqueeze(0)).mean().item<double>();
            lqs += Metrics.ImageMetrics.Psnr(lq, hq.unsqueeze(0)).mean().item<double>();
        }
        return (s1 / images, lqs / images);
    }

    static JsonObject RecipeJson(TinyRecipeOptions o, double scale, Dictionary<string, string> sha, Dictionary<string, double> finals,
        Dictionary<string, double> seconds, JsonObject heldOut, double wallSeconds)
    {
        JsonObject Stage(TinyStage s) => new() { ["steps"] = s.Steps, ["batch"] = s.Batch, ["crop"] = s.Crop, ["learning_rate"] = s.LearningRate };
        JsonObject Nums(Dictionary<string, double> d) => new(d.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(Math.Round(kv.Value, 6)))));
        return new JsonObject
        {
            ["format"] = 1,
            ["command"] = $"diffbir-lab weights train-tiny --seed {o.Seed} --threads {o.Threads}",
            ["seed"] = o.Seed,
            ["threads"] = o.Threads,
            ["libtorch"] = RunInfo.LibTorchVersion,
            ["model"] = new JsonObject
            {
                ["cldm"] = JsonNode.Parse(CldmJson),
                ["latent_scale_factor"] = scale,
                ["stage1"] = $"SwinIR embed 32, depths [2, 2], heads [2, 2], window 8, mlp 2, pixel-unshuffle {o.Stage1Scale}, nearest+conv, no DropPath",
                ["stage1_config"] = Stage1Json(Stage1ConfigFor(o.Stage1Scale)),
                ["clip"] = $"not trained, not stored: Presets.RandomInit(clip, {ClipSeed}) at load",
                ["prompt"] = Prompt,
                ["schedule"] = o.Schedule,
                ["schedule_description"] = o.Schedule == "v2.1" ? "v2.1 (linear-sqrt β rescaled to zero terminal SNR, v-prediction)" : "v2 (linear-sqrt β, ε-prediction)",
                ["dtype"] = "float16 on disk, float32 at run time",
            },
            ["data"] = new JsonObject
            {
                ["family"] = "DiffBIR.Lab.Data.ProceduralImages (docs/tiny-preset.md)",
                ["images"] = o.Images, ["indices"] = $"0..{o.Images - 1}", ["size"] = o.ImageSize,
                ["degradation"] = "Eq. 2 (FirstOrderDegradation) with TinyTrainingData.Degradation: blur σ∈[0.1,3] 21 taps, r∈[1,4], δ∈[0,15], q∈[30,100]",
            },
            ["stages"] = new JsonObject { ["vae"] = Stage(o.Vae), ["prior"] = Stage(o.Prior), ["stage1"] = Stage(o.Stage1), ["stage2"] = Stage(o.Stage2) },
            ["learning_rate_decay"] = $"every stage: constant, then linear to 0 over the last {o.DecayFraction:0.##} of its steps",
            ["decay_fraction"] = o.DecayFraction,
            ["final_losses"] = Nums(finals),
            ["held_out"] = heldOut,
            ["seconds"] = Nums(seconds),
            ["wall_seconds"] = Math.Round(wallSeconds, 1),
            ["sha256"] = new JsonObject(sha.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value)))),
        };
    }

    static string Invariant(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}
