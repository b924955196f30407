using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Metrics.ClipIqa;
using DiffBIR.Lab.Models.Clip;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>
/// iqa/clipiqa.safetensors: pyiqa CLIP-IQA (run a: no positional embedding; run b: positional embedding resampled)
/// and CLIP-IQA+ (run c: learned prompts) on a reduced RN50-style CLIP — every ResNet stage, the image and text
/// features, the logits, the pair probabilities and the score. Also checks the regenerated token embedding against
/// the fixture's checksums and our BPE tokenizer against the stored prompt token ids.
/// </summary>
public sealed class ClipIqaCase : IParityCase
{
    public string Case => "clipiqa";
    public string Description => "pyiqa CLIPIQA ('clipiqa', pos_embedding on/off, 'clipiqa+'): ResNet stages, features, logits, probs, score";
    // Fallback only: every output gets its own band from the fixture's float32-vs-float64 max_rel (see Band).
    public Tolerance DefaultTolerance => new(1e-5, 0);

    /// <summary>4× the fixture's float32-vs-float64 max_rel of the output (0 there — a pure concatenation — means exact).</summary>
    public static Tolerance Band(Fixture f, string output)
    {
        var rel = (double?)f.MetaJson("tolerance")?["f32_vs_f64"]?[output]?["max_rel"];
        return rel is null ? new(1e-5, 0) : new(4 * rel.Value, 0);
    }

    /// <summary>The fixture's CLIP + CLIPIQA weights with the token embedding regenerated (it is not stored).</summary>
    public static Dictionary<string, Tensor> WeightsWithTokenEmbedding(Fixture f, OpenAiClipConfig clip)
    {
        var w = f.Weights();
        long seed = long.Parse(f.Metadata["seed"]);
        w["token_embedding.weight"] = CounterInit.ClipTokenEmbedding(seed, clip.VocabSize, clip.TransformerWidth);
        return w;
    }

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var cfg = f.Config!;
        var clipCfg = OpenAiClipConfig.FromJson(cfg["clip"]!);
        var weights = WeightsWithTokenEmbedding(f, clipCfg);
        var promptTokens = f.In("prompt_tokens");
        var plusTokens = f.In("plus_tokenized_prompts");

        // The regenerated embedding against the checksums the generator stored (metadata hashinit).
        var hash = f.MetaJson("hashinit")!["token_embedding.weight"]!;
        var emb = weights["token_embedding.weight"].to(ScalarType.Float64);
        var flat = emb.flatten();
        var got = torch.cat(new[] { emb.sum().reshape(1), emb.abs().sum().reshape(1), flat.narrow(0, 0, 4), flat.narrow(0, flat.shape[0] - 1, 1) });
        var want = torch.tensor(new[] { (double)hash["sum"]!, (double)hash["abs_sum"]! }
            .Concat(hash["first4"]!.AsArray().Select(x => (double)x!)).Append((double)hash["last"]!).ToArray(), ScalarType.Float64);
        yield return new CaseOutput("token_embedding.weight (regenerated): sum, abs_sum, first4, last", got, Expected: want, Tolerance: new(1e-9, 0));

        // Our tokenizer on the official prompts (the vocabulary sits one folder up, beside the other fixtures).
        var vocab = new[] { Path.GetDirectoryName(f.Path)!, Path.Combine(Path.GetDirectoryName(f.Path)!, "..") }
            .Select(d => Path.Combine(d, TokenizerCase.VocabFile)).FirstOrDefault(File.Exists);
        if (vocab == null)
        {
            yield return CaseOutput.Skip("prompt_tokens (our tokenizer)", $"{TokenizerCase.VocabFile} not found beside the fixture or one folder up");
            yield return CaseOutput.Skip("plus_tokenized_prompts (our tokenizer)", $"{TokenizerCase.VocabFile} not found");
        }
        else
        {
            var tok = new ClipTokenizer(vocab);
            yield return new CaseOutput("prompt_tokens (our tokenizer)", tok.Tokenize(ClipIqaPrompts.Pairs, clipCfg.ContextLength),
                Expected: promptTokens.to(ScalarType.Int64), Tolerance: new(0, 0));
            yield return new CaseOutput("plus_tokenized_prompts (our tokenizer)", tok.Tokenize(ClipIqaPrompts.PlusInitPrompts(), clipCfg.ContextLength),
                Expected: plusTokens.to(ScalarType.Int64), Tolerance: new(0, 0));
        }

        var opts = cfg["metric_opts"]!.AsObject();
        foreach (var (run, o) in opts)
        {
            var mc = ClipIqaConfig.FromJson(o!, cfg["clip"]);
            using var metric = new ClipIqaMetric(mc, promptTokens, mc.UsesPromptLearner ? plusTokens : null);
            var sd = mc.UsesPromptLearner ? weights
                : weights.Where(kv => !kv.Key.StartsWith("prompt_learner.", StringComparison.Ordinal)).ToDictionary(kv => kv.Key, kv => kv.Value);
            metric.LoadStateDict(sd, strict: true, sourceName: f.Path);
            var r = metric.Evaluate(f.In($"{run}.x"));
            CaseOutput Out(string name, Tensor t) => new($"{run}.{name}", t, Tolerance: Band(f, $"{run}.{name}"));
            yield return Out("score", r.Score);
            yield return Out("visual.stem", r.Visual.Stem);
            yield return Out("visual.layer1", r.Visual.Layer1);
            yield return Out("visual.layer2", r.Visual.Layer2);
            yield return Out("visual.layer3", r.Visual.Layer3);
            yield return Out("visual.layer4", r.Visual.Layer4);
            yield return Out("image_features", r.ImageFeatures);
            yield return Out("text_features", r.TextFeatures);
            yield return Out("logits_per_image", r.LogitsPerImage);
            yield return Out("probs", r.Probs);
            if (r.AttnPoolPosResized is { } pos) yield return Out("attnpool_pos_resized", pos);
            if (r.PromptEmbeddings is { } pe) yield return Out("prompt_embeddings", pe);
        }
    }
}

/// <summary>Full-size schema checks of the IQA folder (iqa/schema/*.json with iqa/schema/summary.json's counts).</summary>
public abstract class ClipIqaSchemaCaseBase : IqaSchemaCase { }

/// <summary>iqa/schema/clip_rn50.json: OpenAI CLIP RN50 as build_model constructs it (489 keys), built on the meta device.</summary>
public sealed class ClipRn50SchemaCase : ClipIqaSchemaCaseBase
{
    public override string Case => "schema_clip_rn50";
    public override string Description => "full-size OpenAI CLIP RN50 state_dict keys and shapes (pyiqa CLIPIQA backbone), built on the meta device";
    protected override string SummaryKey => "clip_rn50";
    protected override nn.Module Build() => new OpenAiClip(OpenAiClipConfig.RN50);
}

/// <summary>iqa/schema/clipiqa_plus.json: CLIPIQA('clipiqa+').state_dict() — prompt_learner.ctx / token_prefix / token_suffix only.</summary>
public sealed class ClipIqaPlusSchemaCase : ClipIqaSchemaCaseBase
{
    public override string Case => "schema_clipiqa_plus";
    public override string Description => "full-size CLIPIQA('clipiqa+') state_dict (the prompt learner; CLIP is outside it), built on the meta device";
    protected override string SummaryKey => "clipiqa_plus";
    protected override nn.Module Build() => new ClipIqaMetric(ClipIqaConfig.ClipIqaPlus,
        torch.zeros(10, 77, ScalarType.Int64), torch.zeros(2, 77, ScalarType.Int64));
}
