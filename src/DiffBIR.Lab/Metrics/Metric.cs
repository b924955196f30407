using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Metrics.ClipIqa;
using DiffBIR.Lab.Metrics.Lpips;
using DiffBIR.Lab.Metrics.Maniqa;
using DiffBIR.Lab.Metrics.Musiq;
using DiffBIR.Lab.Metrics.Niqe;
using DiffBIR.Lab.Models.Clip;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics;

/// <summary>Whether a metric compares with a reference image (FR) or judges the image alone (NR).</summary>
public enum MetricKind { FullReference, NoReference }

/// <summary>
/// One file a metric loads from the weights folder. <see cref="Id"/> is its entry in <c>weights/manifest.json</c>
/// (URL, checksum; <c>diffbir-lab weights fetch metrics</c> downloads it). When the downloaded file cannot be read
/// as it is, <see cref="Converted"/> names the file the metric reads instead and <see cref="HowToConvert"/> says how
/// to make it.
/// </summary>
public sealed record MetricWeight(string Id, string File, string? Converted = null, string? HowToConvert = null)
{
    /// <summary>The file the metric actually opens.</summary>
    public string LoadedFile => Converted ?? File;
}

/// <summary>
/// What a metric is: name (pyiqa's), FR or NR, the input it expects, which direction is better, the range of its
/// scores, the weights it needs, and where its numbers come from.
/// </summary>
public sealed record MetricInfo(
    string Name, MetricKind Kind, bool HigherIsBetter, string Input, string ScoreRange,
    IReadOnlyList<MetricWeight> Weights, string Source)
{
    public bool NeedsReference => Kind == MetricKind.FullReference;
    public bool NeedsWeights => Weights.Count > 0;
}

/// <summary>Whether a metric can load its trained weights, and if not, why (each missing file named).</summary>
public sealed record MetricAvailability(bool Available, string Reason);

/// <summary>A metric cannot run because weight files are missing (or unconverted); the message names each file.</summary>
public sealed class MetricUnavailableException : FileNotFoundException
{
    public string Metric { get; }
    public MetricUnavailableException(string metric, string reason, string? file = null) : base($"{metric}: {reason}", file) => Metric = metric;
}

/// <summary>
/// The image-quality metrics by pyiqa name: <c>Metric.Get("musiq")</c>. Each takes images in either layout of
/// <see cref="MetricInput"/> (uint8 NHWC, or float NCHW in [0, 1]) and returns one score per image.
/// </summary>
/// <remarks>
/// A learned metric loads its official weights from the weights folder, or refuses: it never returns a number from
/// untrained weights unless asked explicitly (<c>randomWeightsForTests: true</c>), and then <see cref="RandomWeights"/>
/// is true and <see cref="Label"/> says so — for tests and timing only.
/// </remarks>
public abstract class Metric : IDisposable
{
    public MetricInfo Info { get; }
    public string Name => Info.Name;

    /// <summary>True when the network has seeded random weights (a test / benchmark mode): its scores mean nothing.</summary>
    public bool RandomWeights { get; }

    /// <summary>The name, with "[RANDOM WEIGHTS — not the trained metric]" appended in the random mode.</summary>
    public string Label => RandomWeights ? $"{Name} [RANDOM WEIGHTS — not the trained metric]" : Name;

    protected Metric(MetricInfo info, bool randomWeights) { Info = info; RandomWeights = randomWeights; }

    const string FetchHint = "run `diffbir-lab weights fetch metrics`";
    const string ConvertRn50 =
        "it is an OpenAI TorchScript archive, which DiffBIR.Lab does not load (loading TorchScript means running its code); "
        + "convert it once with PyTorch: python3 -c \"import torch; torch.save(torch.jit.load('weights/RN50.pt', map_location='cpu').state_dict(), 'weights/RN50.state_dict.pth')\"";

    static readonly MetricWeight Bpe = new("bpe_vocab", "bpe_simple_vocab_16e6.txt.gz");
    static readonly MetricWeight Rn50 = new("clip_rn50", "RN50.pt", "RN50.state_dict.pth", ConvertRn50);

    static readonly MetricInfo[] All =
    {
        new("psnr", MetricKind.FullReference, true,
            "RGB in [0, 1] (uint8 → /255), any size, same size as the reference; computed in float64 on all channels",
            "0 … 80 dB (identical images: 80)", Array.Empty<MetricWeight>(),
            "10·log10(1 / (MSE + 1e-8)) as DiffBIR's calculate_psnr_pt (BasicSR) and pyiqa 'psnr' (RGB, no crop)"),
        new("ssim", MetricKind.FullReference, true,
            "RGB in [0, 1] (uint8 → /255), each side ≥ 11 px, same size as the reference; mean of the per-channel SSIM",
            "−1 … 1", Array.Empty<MetricWeight>(),
            "skimage.metrics.structural_similarity (gaussian σ = 1.5, data range 1) on RGB — NOT pyiqa 'ssim', which uses the Y channel of YIQ"),
        new("lpips", MetricKind.FullReference, false,
            "RGB in [0, 1] (uint8 → /255), each side ≥ 31 px, same size as the reference, no resizing",
            "0 … ~1 (identical images: 0)",
            new[] { new MetricWeight("lpips_v0.1_alex", "LPIPS_v0.1_alex-df73285e.pth"), new MetricWeight("torchvision_alexnet", "alexnet-owt-7be5be79.pth") },
            "pyiqa 'lpips': LPIPS v0.1, AlexNet trunk (torchvision IMAGENET1K_V1) + learned heads"),
        new("lpips-vgg", MetricKind.FullReference, false,
            "RGB in [0, 1] (uint8 → /255), each side ≥ 16 px, same size as the reference, no resizing",
            "0 … ~1 (identical images: 0)",
            new[] { new MetricWeight("lpips_v0.1_vgg", "LPIPS_v0.1_vgg-a78928a0.pth"), new MetricWeight("torchvision_vgg16", "vgg16-397923af.pth") },
            "pyiqa 'lpips-vgg': LPIPS v0.1, VGG16 trunk (torchvision IMAGENET1K_V1) + learned heads"),
        new("musiq", MetricKind.NoReference, true,
            "RGB in [0, 1] (uint8 → /255), any size (multi-scale: longer side 224 and 384, plus the original resolution)",
            "~0 … ~100 (KonIQ-10k MOS)",
            new[] { new MetricWeight("musiq_koniq", "musiq_koniq_ckpt-e95806b9.pth") },
            "pyiqa 'musiq' (MUSIQ trained on KonIQ-10k)"),
        new("musiq-ava", MetricKind.NoReference, true,
            "RGB in [0, 1] (uint8 → /255), any size (multi-scale, as musiq)",
            "1 … 10 (AVA mean score)",
            new[] { new MetricWeight("musiq_ava", "musiq_ava_ckpt-e8d3f067.pth") },
            "pyiqa 'musiq-ava' (MUSIQ trained on AVA, 10-bin distribution → mean)"),
        new("clipiqa", MetricKind.NoReference, true,
            "RGB in [0, 1] (uint8 → /255), each side ≥ 31 px, used at its own size (no resize or crop)",
            "0 … 1",
            new[] { Rn50, Bpe },
            "pyiqa 'clipiqa' (CLIP RN50, 5 antonym prompt pairs)"),
        new("clipiqa+", MetricKind.NoReference, true,
            "RGB in [0, 1] (uint8 → /255), each side ≥ 31 px, used at its own size (no resize or crop)",
            "0 … 1",
            new[] { Rn50, Bpe, new MetricWeight("clipiqa+_prompts", "CLIP-IQA+_learned_prompts-603f3273.pth") },
            "pyiqa 'clipiqa+' (CLIP RN50, learned prompts)"),
        new("maniqa", MetricKind.NoReference, true,
            "RGB in [0, 1] (uint8 → /255), any size: shorter side ≤ 224 is first resized to 225, then 20 uniform 224×224 crops",
            "~0 … ~1",
            new[] { new MetricWeight("maniqa_koniq", "ckpt_koniq10k.pt") },
            "pyiqa 'maniqa' (MANIQA trained on KonIQ-10k, ViT-B/8 backbone)"),
        new(NiqeLabName, MetricKind.NoReference, false,
            "RGB in [0, 1] (uint8 → /255) or grey, each side ≥ 32 px (one block); read as grey levels round(255·Y), Y of YIQ",
            "0 … ~100 (0: the statistics of the pristine set)", Array.Empty<MetricWeight>(),
            "NIQE (Mittal et al. 2013, as its MATLAB release and pyiqa 'niqe' compute it) with the pristine model fitted by DiffBIR.Lab on "
            + "its own procedural HQ images (32-px blocks; weights/" + NiqeLab.ModelFile + ", committed): needs no download. "
            + "NOT pyiqa 'niqe', whose model was fitted on 125 photographs with 96-px blocks: the numbers are not comparable"),
    };

    /// <summary>The weight-free NIQE of the lab: pristine model fitted on the project's own HQ images.</summary>
    public const string NiqeLabName = "niqe-lab";

    /// <summary>Every metric name, in pyiqa's spelling.</summary>
    public static IReadOnlyList<string> Names { get; } = All.Select(i => i.Name).ToArray();

    /// <summary>What a metric is, without building it.</summary>
    public static MetricInfo Describe(string name) =>
        All.FirstOrDefault(i => i.Name == Normalise(name))
        ?? throw new ArgumentException($"unknown metric '{name}' (known: {string.Join(", ", Names)})");

    static string Normalise(string name) => name.Trim().ToLowerInvariant();

    /// <summary>Whether <see cref="Get"/> would load the trained metric from <paramref name="weightsDir"/>, and if not why (naming each missing file).</summary>
    public static MetricAvailability Availability(string name, string weightsDir = "weights")
    {
        var info = Describe(name);
        if (info.Name == NiqeLabName)
            return NiqeLab.FindModel(weightsDir) is null
                ? new(false, $"unavailable: {Path.Combine(weightsDir, NiqeLab.ModelFile)} missing (it is committed with the repository; regenerate it with `diffbir-lab metrics fit-niqe`)")
                : new(true, "");
        var problems = new List<string>();
        foreach (var w in info.Weights)
        {
            var loaded = Path.Combine(weightsDir, w.LoadedFile);
            if (File.Exists(loaded)) continue;
            var downloaded = Path.Combine(weightsDir, w.File);
            var how = w.HowToConvert?.Replace("'weights/", "'" + weightsDir.TrimEnd('/') + "/", StringComparison.Ordinal);
            if (w.Converted != null && File.Exists(downloaded)) problems.Add($"{loaded} missing — {downloaded} is present but {how}");
            else if (w.Converted != null) problems.Add($"{downloaded} missing ({FetchHint}); then {how}");
            else problems.Add($"{downloaded} missing ({FetchHint})");
        }
        return problems.Count == 0 ? new(true, "") : new(false, "unavailable: " + string.Join("; ", problems));
    }

    /// <summary>
    /// The metric <paramref name="name"/> (pyiqa's name: psnr, ssim, lpips, lpips-vgg, musiq, musiq-ava, clipiqa,
    /// clipiqa+, maniqa) with its official weights from <paramref name="weightsDir"/>.
    /// </summary>
    /// <param name="randomWeightsForTests">Build the network with seeded random weights instead (no files read): for
    /// tests and timing only. The metric's <see cref="RandomWeights"/> and <see cref="Label"/> say so.</param>
    /// <param name="seed">Seed of the random weights.</param>
    /// <exception cref="MetricUnavailableException">A weight file is missing: "unavailable: weights/… missing".</exception>
    public static Metric Get(string name, string weightsDir = "weights", bool randomWeightsForTests = false, long seed = 0)
    {
        var info = Describe(name);
        if (!randomWeightsForTests)
        {
            var (ok, reason) = Availability(info.Name, weightsDir);
            if (!ok)
                throw new MetricUnavailableException(info.Name, reason,
                    info.Name == NiqeLabName ? Path.Combine(weightsDir, NiqeLab.ModelFile)
                    : info.Weights.Select(w => Path.Combine(weightsDir, w.LoadedFile)).First(f => !File.Exists(f)));
        }
        string W(int i) => Path.Combine(weightsDir, info.Weights[i].LoadedFile);
        bool rnd = randomWeightsForTests;
        return info.Name switch
        {
            "psnr" => new FunctionMetric(info, (x, r) => ImageMetrics.Psnr(x, r!)),
            "ssim" => new FunctionMetric(info, (x, r) => ImageMetrics.Ssim(x, r!)),
            "lpips" => new LpipsAdapter(info, LpipsConfig.Alex, rnd ? null : (W(0), W(1)), seed),
            "lpips-vgg" => new LpipsAdapter(info, LpipsConfig.Vgg, rnd ? null : (W(0), W(1)), seed),
            "musiq" => new MusiqAdapter(info, MusiqConfig.Koniq, rnd ? null : W(0), seed),
            "musiq-ava" => new MusiqAdapter(info, MusiqConfig.Ava, rnd ? null : W(0), seed),
            "clipiqa" => new ClipIqaAdapter(info, ClipIqaConfig.ClipIqa, rnd ? null : (W(0), W(1), null), weightsDir, seed),
            "clipiqa+" => new ClipIqaAdapter(info, ClipIqaConfig.ClipIqaPlus, rnd ? null : (W(0), W(1), W(2)), weightsDir, seed),
            "maniqa" => new ManiqaAdapter(info, ManiqaConfig.Koniq, rnd ? null : W(0), seed),
            NiqeLabName => new NiqeMetric(info, NiqeModel.Load(NiqeLab.FindModel(weightsDir)
                ?? throw new MetricUnavailableException(info.Name, "unavailable: the model file is missing", Path.Combine(weightsDir, NiqeLab.ModelFile)))),
            _ => throw new ArgumentException($"unknown metric '{name}'"),
        };
    }

    /// <summary>
    /// One score per image, as a double[N].
    /// </summary>
    /// <param name="image">The image(s) to assess (pyiqa's <c>target</c>): uint8 NHWC or float NCHW in [0, 1] (see <see cref="MetricInput"/>).</param>
    /// <param name="reference">For full-reference metrics: the reference, same layout rules, same height and width,
    /// same batch size (or 1). Must be null for no-reference metrics.</param>
    public double[] Score(Tensor image, Tensor? reference = null)
    {
        if (Info.NeedsReference && reference is null)
            throw new ArgumentException($"{Name} is a full-reference metric: give the reference image");
        if (!Info.NeedsReference && reference is not null)
            throw new ArgumentException($"{Name} is a no-reference metric: it takes no reference image");
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        var x = MetricInput.ToFloatNchw(image, "image");
        Tensor? r = null;
        if (reference is not null)
        {
            r = MetricInput.ToFloatNchw(reference, "reference");
            if (x.shape[2] != r.shape[2] || x.shape[3] != r.shape[3])
                throw new ArgumentException($"{Name}: the image is {x.shape[2]}×{x.shape[3]} (H×W) but the reference is {r.shape[2]}×{r.shape[3]}");
            if (x.shape[1] != r.shape[1])
                throw new ArgumentException($"{Name}: the image has {x.shape[1]} channel(s), the reference {r.shape[1]}");
            if (x.shape[0] != r.shape[0])
            {
                if (r.shape[0] == 1) r = r.expand(x.shape[0], -1, -1, -1);
                else throw new ArgumentException($"{Name}: {x.shape[0]} images but {r.shape[0]} references");
            }
        }
        var s = Compute(x, r).reshape(-1).to_type(ScalarType.Float64).cpu();
        return s.data<double>().ToArray();
    }

    /// <summary>The metric on validated input: float NCHW in [0, 1] (and a reference of the same shape for FR) → [N] or [N, 1].</summary>
    protected abstract Tensor Compute(Tensor x, Tensor? reference);

    public void Dispose() { Dispose(true); GC.SuppressFinalize(this); }
    protected virtual void Dispose(bool disposing) { }

    // ---------------------------------------------------------------------------------------------------------------

    sealed class FunctionMetric : Metric
    {
        readonly Func<Tensor, Tensor?, Tensor> f;
        public FunctionMetric(MetricInfo info, Func<Tensor, Tensor?, Tensor> f) : base(info, false) => this.f = f;
        protected override Tensor Compute(Tensor x, Tensor? reference) => f(x, reference);
    }

    sealed class NiqeMetric : Metric
    {
        readonly NiqeModel model;
        public NiqeMetric(MetricInfo info, NiqeModel model) : base(info, false) => this.model = model;
        protected override Tensor Compute(Tensor x, Tensor? reference)
        {
            var scores = new double[x.shape[0]];
            for (int i = 0; i < scores.Length; i++) scores[i] = Niqe.Niqe.Score(Niqe.Niqe.GreyLevels(x[i]), model);
            return torch.tensor(scores, ScalarType.Float64);
        }
    }

    /// <summary>A learned metric: one network, built with official or seeded random weights.</summary>
    abstract class NetworkMetric<TNet> : Metric where TNet : nn.Module
    {
        protected readonly TNet Net;
        protected NetworkMetric(MetricInfo info, TNet net, bool random) : base(info, random) { Net = net; Net.eval(); }
        protected override void Dispose(bool disposing) { if (disposing) Net.Dispose(); }
    }

    sealed class LpipsAdapter : NetworkMetric<LpipsMetric>
    {
        public LpipsAdapter(MetricInfo info, LpipsConfig config, (string Heads, string Trunk)? files, long seed)
            : base(info, new LpipsMetric(config), files is null)
        {
            if (files is not { } f) { RandomInit.Fill(Net, seed); return; }
            // pyiqa: the trunk comes from torchvision's IMAGENET1K_V1 file (features.<i>.*), the heads from the LPIPS
            // release (lin<k>.model.1.weight); the official self.lins holds the same heads again.
            using var heads = Checkpoint.Load(f.Heads);
            using var trunk = Checkpoint.Load(f.Trunk);
            int[] cuts = config.IsVgg ? new[] { 0, 4, 9, 16, 23, 30 } : new[] { 0, 2, 5, 8, 10, 12 };
            var sd = new Dictionary<string, Tensor>(StringComparer.Ordinal);
            foreach (var (k, v) in trunk.Tensors)
            {
                if (!k.StartsWith("features.", StringComparison.Ordinal)) continue; // classifier.*: unused by LPIPS
                var parts = k.Split('.');
                int idx = int.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture);
                int slice = Array.FindIndex(cuts, c => c > idx);
                if (slice < 1) continue; // the final max-pool has no weights; any index past the last cut is unused
                sd[$"net.slice{slice}.{idx}.{parts[2]}"] = v;
            }
            foreach (var (k, v) in heads.Tensors)
            {
                sd[k] = v;
                if (k.StartsWith("lin", StringComparison.Ordinal) && k.Length > 3 && char.IsDigit(k[3]))
                    sd["lins." + k[3] + k[4..]] = v;
            }
            foreach (var (k, v) in Net.state_dict())
                if (k.StartsWith("scaling_layer.", StringComparison.Ordinal)) sd[k] = v;
            StateDictLoader.Load(Net, sd, strict: true, sourceName: $"{f.Heads} + {f.Trunk}");
        }
        protected override Tensor Compute(Tensor x, Tensor? reference) => Net.Score(x, reference!);
    }

    sealed class MusiqAdapter : NetworkMetric<MusiqModel>
    {
        public MusiqAdapter(MetricInfo info, MusiqConfig config, string? file, long seed) : base(info, new MusiqModel(config), file is null)
        {
            if (file is null) { RandomInit.Fill(Net, seed); return; }
            using var sd = Checkpoint.Load(file);
            StateDictLoader.Load(Net, sd.Tensors, strict: true, sourceName: file);
        }
        protected override Tensor Compute(Tensor x, Tensor? reference) => Net.Score(x.to_type(ScalarType.Float32));
    }

    sealed class ManiqaAdapter : NetworkMetric<ManiqaMetric>
    {
        public ManiqaAdapter(MetricInfo info, ManiqaConfig config, string? file, long seed) : base(info, new ManiqaMetric(config), file is null)
        {
            if (file is null) { RandomInit.Fill(Net, seed); return; }
            using var sd = Checkpoint.Load(file);
            Net.LoadStateDict(sd.Tensors, strict: true, sourceName: file);
        }
        protected override Tensor Compute(Tensor x, Tensor? reference) => Net.Score(x.to_type(ScalarType.Float32));
    }

    sealed class ClipIqaAdapter : NetworkMetric<ClipIqaMetric>
    {
        public ClipIqaAdapter(MetricInfo info, ClipIqaConfig config, (string Clip, string Bpe, string? Prompts)? files, string weightsDir, long seed)
            : base(info, Build(config, files?.Bpe ?? Path.Combine(weightsDir, Bpe.File)), files is null)
        {
            if (files is not { } f)
            {
                RandomInit.Fill(Net.Clip, seed);
                RandomInit.Fill(Net, seed + 1);
                Net.Prompts?.InitFromTokenEmbedding(Net.Clip, alsoCtx: false);
                return;
            }
            using var clip = Checkpoint.Load(f.Clip);
            var sd = new Dictionary<string, Tensor>(clip.Tensors, StringComparer.Ordinal);
            if (f.Prompts is { } p)
            {
                // The released CLIP-IQA+ prompts are a bare tensor (pyiqa: prompt_learner.ctx.data = torch.load(...)).
                var ctx = TorchPickleFile.Load(p) as Tensor
                          ?? throw new CheckpointException(p, "expected a single tensor (the learned prompt context ctx)");
                sd["prompt_learner.ctx"] = ctx;
            }
            Net.LoadStateDict(sd, strict: true, sourceName: f.Clip);
        }

        static ClipIqaMetric Build(ClipIqaConfig config, string bpe)
        {
            if (File.Exists(bpe)) return new ClipIqaMetric(config, new ClipTokenizer(bpe));
            // Random-weights mode without the BPE file: placeholder token ids ([SOT, i+1, EOT]); labelled random anyway.
            var ctxLen = config.Clip.ContextLength;
            Tensor Tokens(int n)
            {
                var ids = new long[n * ctxLen];
                for (int i = 0; i < n; i++) { ids[i * ctxLen] = ClipTokenizer.StartOfText; ids[i * ctxLen + 1] = i + 1; ids[i * ctxLen + 2] = ClipTokenizer.EndOfText; }
                return torch.tensor(ids, new long[] { n, ctxLen });
            }
            return new ClipIqaMetric(config, Tokens(ClipIqaPrompts.Pairs.Count), config.UsesPromptLearner ? Tokens(2) : null);
        }

        protected override Tensor Compute(Tensor x, Tensor? reference) => Net.Score(x.to_type(ScalarType.Float32));
    }
}

/// <summary>
/// Seeded random weights for the labelled test / benchmark mode of <see cref="Metric.Get"/>: weight matrices and
/// kernels uniform with variance 1/fan_in, biases 0, 1-D weights (norm scales) 1, every other parameter (embeddings,
/// tokens, scales) N(0, 0.02²). Not a trained network.
/// </summary>
public static class RandomInit
{
    public static void Fill(nn.Module module, long seed)
    {
        using var _ = torch.no_grad();
        var gen = new torch.Generator((ulong)seed);
        foreach (var (name, p) in module.named_parameters())
        {
            if (!p.is_floating_point()) continue;
            var leaf = name[(name.LastIndexOf('.') + 1)..];
            if (leaf == "bias") p.zero_();
            else if (leaf == "weight" && p.dim() == 1) p.fill_(1.0);
            else if (leaf == "weight" && p.dim() >= 2)
            {
                double fanIn = p.numel() / p.shape[0];
                double a = Math.Sqrt(3.0 / fanIn);
                p.uniform_(-a, a, gen);
            }
            else p.normal_(0, 0.02, gen);
        }
    }
}
