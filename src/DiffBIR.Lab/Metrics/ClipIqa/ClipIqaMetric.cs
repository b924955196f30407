using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.Clip;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.ClipIqa;

/// <summary>The prompts of pyiqa's CLIP-IQA (official <c>clipiqa_arch.py</c>).</summary>
public static class ClipIqaPrompts
{
    /// <summary>
    /// The 5 antonym pairs pyiqa assembles (positive first); the score is the mean over pairs of the softmax
    /// probability of the positive prompt. Tokenised with OpenAI's <c>clip.tokenize</c> (context 77).
    /// </summary>
    public static IReadOnlyList<string> Pairs { get; } = new[]
    {
        "Good image", "bad image", "Sharp image", "blurry image", "sharp edges", "blurry edges",
        "High resolution image", "low resolution image", "Noise-free image", "noisy image",
    };

    /// <summary>
    /// CLIP-IQA+'s init prompts ('X' × n_ctx, then 'Good photo..' / 'Bad photo..'); only their token ids and the
    /// embeddings of their SOT and class/suffix tokens are used (official <c>PromptLearner.__init__</c>).
    /// </summary>
    public static IReadOnlyList<string> PlusInitPrompts(int nCtx = 16)
    {
        var prefix = string.Join(' ', Enumerable.Repeat("X", nCtx)) + " ";
        return new[] { prefix + "Good photo..", prefix + "Bad photo.." };
    }
}

/// <summary>
/// Constructor arguments of pyiqa's <c>CLIPIQA</c> (names in brackets).
/// </summary>
/// <param name="ModelType"><c>model_type</c>: "clipiqa" (fixed prompts) or any name containing "clipiqa+"
/// ("clipiqa+", "clipiqa+_rn50_512": learned prompts, <see cref="PromptLearner"/>).</param>
/// <param name="PosEmbedding"><c>pos_embedding</c>: resample and add the attention pool's positional embedding (false for
/// the metrics 'clipiqa' and 'clipiqa+'; true for 'clipiqa+_rn50_512').</param>
/// <param name="Clip">The CLIP backbone (<c>backbone</c>; 'RN50' by default; ViT backbones are not ported).</param>
/// <param name="NCtx">Learned context tokens of CLIP-IQA+ (<c>PromptLearner(n_ctx=16)</c>).</param>
public sealed record ClipIqaConfig(string ModelType = "clipiqa", bool PosEmbedding = false, OpenAiClipConfig? Clip = null, int NCtx = 16)
{
    public OpenAiClipConfig Clip { get; init; } = Clip ?? OpenAiClipConfig.RN50;

    /// <summary>True when the text side is CLIP-IQA+'s learned prompts (official <c>'clipiqa+' in model_type</c>).</summary>
    public bool UsesPromptLearner => ModelType.Contains("clipiqa+", StringComparison.Ordinal);

    /// <summary>pyiqa metric 'clipiqa' (RN50, fixed prompts, no positional embedding).</summary>
    public static ClipIqaConfig ClipIqa { get; } = new();
    /// <summary>pyiqa metric 'clipiqa+' (RN50, learned prompts CLIP-IQA+_learned_prompts-603f3273.pth).</summary>
    public static ClipIqaConfig ClipIqaPlus { get; } = new("clipiqa+");
    /// <summary>pyiqa metric 'clipiqa+_rn50_512' (RN50, learned prompts, positional embedding resampled).</summary>
    public static ClipIqaConfig ClipIqaPlusRn50_512 { get; } = new("clipiqa+_rn50_512", PosEmbedding: true);

    /// <summary>
    /// Reads pyiqa's <c>metric_opts</c> (<c>type</c> CLIPIQA, <c>model_type</c>, <c>backbone</c>, <c>pretrained</c>,
    /// <c>pos_embedding</c>); <paramref name="clip"/> gives the backbone's <c>CLIP(...)</c> arguments when
    /// <c>backbone</c> is not 'RN50' (a path to an archive, as in the fixtures).
    /// </summary>
    public static ClipIqaConfig FromJson(JsonNode metricOpts, JsonNode? clip = null)
    {
        var o = metricOpts.AsObject();
        Models.Stage1.ConfigJson.RejectUnknown(o, "CLIPIQA", new[] { "type", "model_type", "backbone", "pretrained", "pos_embedding" });
        if (o["type"] is { } type && (string)type! != "CLIPIQA") throw new ArgumentException($"metric_opts.type is '{type}', not CLIPIQA");
        var backbone = (string?)o["backbone"] ?? "RN50";
        var clipCfg = backbone == "RN50" ? OpenAiClipConfig.RN50
            : clip != null ? OpenAiClipConfig.FromJson(clip)
            : throw new NotSupportedException($"CLIPIQA backbone '{backbone}': only RN50 (or an explicit CLIP config) is ported");
        return new ClipIqaConfig((string?)o["model_type"] ?? "clipiqa", (bool?)o["pos_embedding"] ?? false, clipCfg);
    }
}

/// <summary>
/// CLIP-IQA+'s learned prompts (official <c>clipiqa_arch.PromptLearner</c>): each of the two prompts is
/// [SOT embedding, ctx[:n/2], the 3 class-token embeddings ('good'/'bad', 'photo', '..'), ctx[n/2:], the rest of the
/// init prompt's embeddings], and the feature is taken at the init prompt's EOT position.
/// </summary>
/// <remarks>Keys: <c>ctx</c> [2, n_ctx, width] (learned; released as a bare tensor), <c>token_prefix</c> [2, 1, width]
/// and <c>token_suffix</c> [2, 77−1−n_ctx, width] (buffers the official constructor computes from the token embedding:
/// see <see cref="ClipIqaMetric.LoadStateDict"/>).</remarks>
public sealed class PromptLearner : nn.Module
{
    internal readonly Parameter ctx;
    /// <summary>Official <c>name_lens</c>, hard-coded to 3 (the final '.' of '..' is not counted).</summary>
    public const int NameLength = 3;
    public int NCtx { get; }

    public PromptLearner(int nCtx, int contextLength, int width, Tensor tokenizedPrompts) : base(nameof(PromptLearner))
    {
        NCtx = nCtx;
        long n = tokenizedPrompts.shape[0];
        ctx = new Parameter(torch.zeros(n, nCtx, width));
        register_buffer("token_prefix", torch.zeros(n, 1, width));
        register_buffer("token_suffix", torch.zeros(n, contextLength - 1 - nCtx, width));
        register_buffer("tokenized_prompts", tokenizedPrompts.to(ScalarType.Int64), persistent: false);
        RegisterComponents();
    }

    internal Tensor TokenPrefix => get_buffer("token_prefix")!;
    internal Tensor TokenSuffix => get_buffer("token_suffix")!;
    /// <summary>Token ids of the init prompts [2, 77]; their argmax is the EOT position the feature is read at.</summary>
    public Tensor TokenizedPrompts => get_buffer("tokenized_prompts")!;

    /// <summary>
    /// Fills the buffers from the CLIP token embedding, as the official constructor does (<c>token_prefix</c> = the SOT
    /// embedding, <c>token_suffix</c> = the embeddings after the n_ctx 'X' tokens); with <paramref name="alsoCtx"/> also
    /// <c>ctx</c> = the 'X' embeddings (the official initial value, before learned prompts are loaded).
    /// </summary>
    public void InitFromTokenEmbedding(OpenAiClip clip, bool alsoCtx)
    {
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var e = clip.EmbedTokens(TokenizedPrompts.to(clip.token_embedding.weight!.device));
        TokenPrefix.copy_(e.narrow(1, 0, 1));
        TokenSuffix.copy_(e.narrow(1, 1 + NCtx, e.shape[1] - 1 - NCtx));
        if (alsoCtx) ctx.copy_(e.narrow(1, 1, NCtx));
    }

    /// <summary>The prompt embeddings [2, 77, width] (official <c>get_prompts_with_middle_class</c>).</summary>
    public Tensor PromptEmbeddings()
    {
        using var scope = torch.NewDisposeScope();
        var c = ctx.to(TokenPrefix.dtype, TokenPrefix.device);
        int half = NCtx / 2;
        var p = torch.cat(new[]
        {
            TokenPrefix,
            c.narrow(1, 0, half),
            TokenSuffix.narrow(1, 0, NameLength),
            c.narrow(1, half, NCtx - half),
            TokenSuffix.narrow(1, NameLength, TokenSuffix.shape[1] - NameLength),
        }, 1);
        return p.MoveToOuterDisposeScope();
    }
}

/// <summary>Everything one CLIP-IQA evaluation computes (the fixture's intermediates); dispose when done.</summary>
public sealed record ClipIqaResult(
    ClipVisualOutput Visual, Tensor TextFeatures, Tensor LogitsPerImage, Tensor Probs, Tensor Score,
    Tensor? AttnPoolPosResized, Tensor? PromptEmbeddings) : IDisposable
{
    /// <summary>Image features [N, embed_dim] (the attention pool's output, before normalisation).</summary>
    public Tensor ImageFeatures => Visual.Pooled;

    public void Dispose()
    {
        Visual.Dispose();
        foreach (var t in new[] { TextFeatures, LogitsPerImage, Probs, Score, AttnPoolPosResized, PromptEmbeddings }) t?.Dispose();
    }
}

/// <summary>
/// pyiqa's CLIP-IQA / CLIP-IQA+ no-reference quality metric (official <c>pyiqa.archs.clipiqa_arch.CLIPIQA</c> as
/// <c>InferenceModel('clipiqa' | 'clipiqa+')</c> runs it). Higher is better; scores lie in (0, 1).
/// </summary>
/// <remarks>
/// <para>The image is normalised with OpenAI CLIP's mean/std and used at its own size (no resize, no crop). The
/// normalised image and every prompt go through CLIP; the cosine logits are scaled by exp(logit_scale), grouped in
/// antonym pairs [N, P/2, 2] (positive first) and soft-maxed per pair; the score is the mean positive probability.</para>
/// <para>State dict: like the official module, <c>state_dict()</c> holds only CLIPIQA's own keys — none for
/// 'clipiqa', <c>prompt_learner.ctx / token_prefix / token_suffix</c> for 'clipiqa+'. The CLIP backbone is held
/// outside it (the official code keeps it in a plain list) and is reached through <see cref="Clip"/>;
/// <see cref="LoadStateDict"/> loads both from one dictionary with the official key names.</para>
/// </remarks>
public sealed class ClipIqaMetric : nn.Module
{
    // OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (pyiqa/archs/constants.py): Python doubles made float32 by torch.Tensor(...),
    // hence double literals rounded once to float.
    static readonly float[] Mean = new[] { 0.48145466, 0.4578275, 0.40821073 }.Select(v => (float)v).ToArray();
    static readonly float[] Std = new[] { 0.26862954, 0.26130258, 0.27577711 }.Select(v => (float)v).ToArray();
    const double RangeEps = 1e-6; // InferenceModel.eps of the input range check

    readonly OpenAiClip[] clipModel; // a plain array, not a registered submodule: CLIP is not in CLIPIQA.state_dict()
    readonly PromptLearner? prompt_learner;

    public ClipIqaConfig Config { get; }
    /// <summary>The CLIP backbone (official <c>clip_model[0]</c>); always in eval mode, as <c>clip.load</c> returns it.</summary>
    public OpenAiClip Clip => clipModel[0];

    /// <summary>
    /// Builds the metric, tokenising the official prompts with OpenAI CLIP's BPE tokenizer
    /// (bpe_simple_vocab_16e6.txt.gz; OpenCLIP ships the same file).
    /// </summary>
    public ClipIqaMetric(ClipIqaConfig config, ClipTokenizer tokenizer)
        : this(config, tokenizer.Tokenize(ClipIqaPrompts.Pairs, config.Clip.ContextLength),
               config.UsesPromptLearner ? tokenizer.Tokenize(ClipIqaPrompts.PlusInitPrompts(config.NCtx), config.Clip.ContextLength) : null)
    { }

    /// <summary>
    /// Builds the metric from token ids already at hand (the fixtures store them): <paramref name="promptTokens"/>
    /// [10, 77] for 'clipiqa', <paramref name="plusInitPromptTokens"/> [2, 77] for 'clipiqa+' (the init prompts
    /// of <see cref="ClipIqaPrompts.PlusInitPrompts"/>).
    /// </summary>
    public ClipIqaMetric(ClipIqaConfig config, Tensor promptTokens, Tensor? plusInitPromptTokens) : base("CLIPIQA")
    {
        Config = config;
        clipModel = new[] { new OpenAiClip(config.Clip) };
        if (promptTokens.shape.Length != 2 || promptTokens.shape[0] % 2 != 0)
            throw new ArgumentException($"prompt tokens must be [2·pairs, context], got [{string.Join(", ", promptTokens.shape)}]");
        register_buffer("prompt_pairs", promptTokens.to(ScalarType.Int64), persistent: false);
        if (config.UsesPromptLearner)
        {
            var plus = plusInitPromptTokens ?? throw new ArgumentException($"model_type '{config.ModelType}' needs the init prompts' token ids");
            prompt_learner = new PromptLearner(config.NCtx, config.Clip.ContextLength, config.Clip.TransformerWidth, plus);
        }
        RegisterComponents();
        eval();
    }

    Tensor PromptPairs => get_buffer("prompt_pairs")!;

    /// <summary>CLIP-IQA+'s prompt learner (null for 'clipiqa').</summary>
    public PromptLearner? Prompts => prompt_learner;

    /// <summary>
    /// Loads one dictionary with the official keys: the OpenAI CLIP keys (<c>visual.*</c>, <c>transformer.*</c>,
    /// <c>token_embedding.weight</c>, …; see <see cref="OpenAiClip.LoadStateDict"/>) into <see cref="Clip"/>, and the
    /// <c>prompt_learner.*</c> keys into this module. As in the official constructor, <c>token_prefix</c> /
    /// <c>token_suffix</c> are computed from the loaded token embedding when the dictionary does not hold them (the
    /// released CLIP-IQA+ file is a bare <c>ctx</c> tensor: pass it as <c>prompt_learner.ctx</c>). Strict: a missing
    /// CLIP key, a missing <c>prompt_learner.ctx</c> (CLIP-IQA+) or any unknown key throws.
    /// </summary>
    public void LoadStateDict(IReadOnlyDictionary<string, Tensor> sd, bool strict = true, string sourceName = "CLIP-IQA state dict")
    {
        const string P = "prompt_learner.";
        var clipPart = sd.Where(kv => !kv.Key.StartsWith(P, StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        var own = sd.Where(kv => kv.Key.StartsWith(P, StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value, StringComparer.Ordinal);
        // Refuse before anything is copied (the CLIP load below is strict on its own keys).
        if (strict && prompt_learner != null && !own.ContainsKey(P + "ctx"))
            throw new StateDictMismatchException(sourceName, $"CLIPIQA('{Config.ModelType}')",
                new LoadReport(new[] { P + "ctx" }, Array.Empty<string>(), Array.Empty<string>(), 0));
        if (strict && prompt_learner == null && own.Count > 0)
            throw new StateDictMismatchException(sourceName, $"CLIPIQA('{Config.ModelType}')",
                new LoadReport(Array.Empty<string>(), own.Keys.ToList(), Array.Empty<string>(), 0));
        Clip.LoadStateDict(clipPart, strict, sourceName);
        if (prompt_learner == null) return;
        bool hasBuffers = own.ContainsKey(P + "token_prefix") && own.ContainsKey(P + "token_suffix");
        if (!hasBuffers)
        {
            prompt_learner.InitFromTokenEmbedding(Clip, alsoCtx: !own.ContainsKey(P + "ctx"));
            own[P + "token_prefix"] = prompt_learner.TokenPrefix;
            own[P + "token_suffix"] = prompt_learner.TokenSuffix;
        }
        if (!own.ContainsKey(P + "ctx") && !strict) own[P + "ctx"] = prompt_learner.ctx;
        StateDictLoader.Load(this, own, strict, sourceName);
    }

    /// <summary>
    /// Every intermediate of one evaluation (what <see cref="Score"/> returns, plus the CLIP stages, features,
    /// logits and pair probabilities). Same input convention as <see cref="Score"/>.
    /// </summary>
    public ClipIqaResult Evaluate(Tensor x)
    {
        CheckInput(x);
        using var _ = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        var clip = Clip;
        // Official: clip_model = self.clip_model[0].to(x) — CLIP follows the input's device. It would follow the
        // dtype too, but pyiqa's float32-casting LayerNorm then meets float64 weights and fails; we run CLIP in its
        // own dtype (float32) and cast the input to it instead.
        if (clip.positional_embedding.device != x.device) clip.to(x.device);
        if (PromptPairs.device != x.device) this.to(x.device);
        x = x.to(clip.positional_embedding.dtype);
        var mean = torch.tensor(Mean, new long[] { 1, 3, 1, 1 }, device: x.device);
        var std = torch.tensor(Std, new long[] { 1, 3, 1, 1 }, device: x.device);
        var xn = (x - mean) / std;

        var visual = clip.EncodeImage(xn, Config.PosEmbedding);
        Tensor text;
        Tensor? promptEmb = null;
        if (prompt_learner != null)
        {
            promptEmb = prompt_learner.PromptEmbeddings();
            text = clip.EncodeTextEmbeddings(promptEmb, prompt_learner.TokenizedPrompts);
        }
        else text = clip.EncodeText(PromptPairs);
        var logits = clip.LogitsPerImage(visual.Pooled, text);
        var probs = logits.reshape(logits.shape[0], -1, 2).softmax(-1);
        var score = probs.select(-1, 0).mean(new long[] { 1 }, keepdim: true);
        Tensor? pos = null;
        if (Config.PosEmbedding)
        {
            var l4 = visual.Layer4;
            pos = clip.visual.attnpool.ResizedPositionalEmbedding(l4.shape[2] * l4.shape[3] + 1);
        }
        var result = new ClipIqaResult(visual, text, logits, probs, score, pos, promptEmb);
        foreach (var t in new[] { visual.Stem, visual.Layer1, visual.Layer2, visual.Layer3, visual.Layer4, visual.Pooled, text, logits, probs, score, pos, promptEmb })
            t?.MoveToOuterDisposeScope();
        return result;
    }

    /// <summary>
    /// Quality scores, as pyiqa's <c>InferenceModel('clipiqa' | 'clipiqa+')(x)</c> returns them.
    /// </summary>
    /// <param name="x">RGB images [N, 3, H, W] (or gray [N, 1, H, W], broadcast against the 3-channel mean/std as
    /// pyiqa does), floating point (computed in float32), values in [0, 1] (checked with pyiqa's 1e-6 slack), any
    /// size with each side ≥ 31 px; the image is NOT resized (CLIP's ResNet is fully convolutional and pyiqa feeds
    /// it the image as it is). Any device: CLIP is moved to the input's device, as pyiqa does.</param>
    /// <returns>[N, 1] scores in (0, 1), higher is better.</returns>
    public Tensor Score(Tensor x)
    {
        using var r = Evaluate(x);
        return r.Score.alias();
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) clipModel[0].Dispose();
        base.Dispose(disposing);
    }

    static void CheckInput(Tensor x)
    {
        if (x.dim() != 4) throw new ArgumentException($"CLIP-IQA input must be 4-D [N, C, H, W], got [{string.Join(", ", x.shape)}]");
        if (x.shape[1] is not (1 or 3)) throw new ArgumentException($"CLIP-IQA input must have 1 or 3 channels, got {x.shape[1]}");
        if (!x.is_floating_point()) throw new ArgumentException($"CLIP-IQA input must be a float tensor in [0, 1], got {x.dtype}");
        if (x.device.type == DeviceType.META) return;
        double lo = x.min().to(ScalarType.Float64).item<double>(), hi = x.max().to(ScalarType.Float64).item<double>();
        if (!(lo > -RangeEps && hi < 1 + RangeEps))
            throw new ArgumentException($"CLIP-IQA input must be normalised to [0, 1], but got min={lo:F4}, max={hi:F4}");
    }
}
