using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.Vae;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>vae: the KL autoencoder's posterior, the scaled latent DiffBIR conditions on, and both decodes.</summary>
public sealed class VaeCase : IParityCase
{
    public string Case => "vae";
    public string Description => "AutoencoderKL (KL-f8): posterior mean/logvar/std, mode·0.18215, decode, decode(z/0.18215)";
    // The fixture's float32-vs-float64 max_rel is ≤ 1.1e-6 for every output.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var vae = new AutoencoderKL(VaeConfig.FromJson(f.Config!));
        StateDictLoader.Load(vae, f.Weights(), strict: true, sourceName: f.Path);
        vae.eval();
        using var _ = torch.no_grad();
        var x = f.In("x");
        var z = f.In("z");
        var posterior = vae.Encode(x);
        yield return new CaseOutput("posterior_mean", posterior.Mean);
        yield return new CaseOutput("posterior_logvar", posterior.LogVar);
        yield return new CaseOutput("posterior_std", posterior.Std);
        yield return new CaseOutput("mode_scaled", vae.EncodeScaled(x));
        yield return new CaseOutput("decode", vae.Decode(z));
        yield return new CaseOutput("decode_of_scaled", vae.DecodeScaled(z));
    }
}

/// <summary>schema/vae.json: the full-size SD 2.1 VAE (configs/inference/cldm.yaml vae_cfg) has exactly the official keys and shapes.</summary>
public sealed class VaeSchemaCase : SchemaCase
{
    public override string Case => "schema_vae";
    public override string Description => "full-size AutoencoderKL state_dict keys and shapes (cldm.yaml vae_cfg), built on the meta device";
    protected override string SummaryKey => "vae";
    protected override nn.Module Build() => new AutoencoderKL(VaeConfig.Sd21);
}

/// <summary>
/// clip: the OpenCLIP ViT-H text encoder in "penultimate" mode on the fixture's token ids; also our tokenizer on the
/// fixture's prompts (metadata <c>prompts</c>) against its <c>in.tokens</c>.
/// </summary>
public sealed class ClipCase : IParityCase
{
    public string Case => "clip";
    public string Description => "FrozenOpenCLIPEmbedder (penultimate layer): token ids → [N, 77, width]; tokenizer on the prompts";
    // The fixture's float32-vs-float64 max_rel is 4.1e-7.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var clip = new FrozenOpenClipEmbedder(ClipConfig.FromJson(f.Config!));
        StateDictLoader.Load(clip, f.Weights(), strict: true, sourceName: f.Path);
        clip.eval();
        using var _ = torch.no_grad();
        var tokens = f.In("tokens");
        yield return new CaseOutput("embedding", clip.forward(tokens));

        var vocab = Path.Combine(Path.GetDirectoryName(f.Path)!, TokenizerCase.VocabFile);
        var prompts = f.MetaJson("prompts")?.AsArray().Select(p => (string)p!).ToList();
        if (prompts is null) yield return CaseOutput.Skip("tokens of the prompts", "fixture metadata has no 'prompts'");
        else if (!File.Exists(vocab)) yield return CaseOutput.Skip("tokens of the prompts", $"{TokenizerCase.VocabFile} not beside the fixture");
        else yield return new CaseOutput("tokens of the prompts", new ClipTokenizer(vocab).Tokenize(prompts, (int)tokens.shape[1]),
            Expected: tokens, Tolerance: new(0, 0));
    }
}

/// <summary>schema/clip.json: the full-size ViT-H-14 text encoder (cldm.yaml clip_cfg) has exactly the official keys and shapes.</summary>
public sealed class ClipSchemaCase : SchemaCase
{
    public override string Case => "schema_clip";
    public override string Description => "full-size FrozenOpenCLIPEmbedder state_dict keys and shapes (cldm.yaml clip_cfg), built on the meta device";
    protected override string SummaryKey => "clip";
    protected override nn.Module Build() => new FrozenOpenClipEmbedder(ClipConfig.VitH14);
}

/// <summary>
/// tokenizer.json: for each of the 42 strings, our BPE ids (no SOT/EOT) and the 77-id row of <c>tokenize</c> must equal
/// the official ones exactly. Strings flagged ftfy_sensitive are compared too: the fixture replaced ftfy by the identity,
/// as we do (see <see cref="ClipTokenizer"/>).
/// </summary>
public sealed class TokenizerCase : IParityCase
{
    public const string VocabFile = "bpe_simple_vocab_16e6.txt.gz";

    public string Case => "tokenizer";
    public string Description => "CLIP BPE tokenizer (SimpleTokenizer.encode and tokenize, context 77)";
    public Tolerance DefaultTolerance => new(0, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        var root = JsonNode.Parse(File.ReadAllText(f.Path))!;
        var tok = new ClipTokenizer(Path.Combine(Path.GetDirectoryName(f.Path)!, VocabFile));
        var entries = root["entries"]!.AsArray();
        for (int i = 0; i < entries.Count; i++)
        {
            var e = entries[i]!;
            var text = (string)e["text"]!;
            var label = $"{i:D2} \"{Preview(text)}\"" + ((bool?)e["ftfy_sensitive"] == true ? " (ftfy-sensitive)" : "");
            yield return new CaseOutput($"{label} bpe_ids", Ids(tok.Encode(text).Select(x => (long)x)), Expected: Ids(e["bpe_ids"]!));
            yield return new CaseOutput($"{label} tokenize_77", Ids(tok.TokenizeOne(text, 77)), Expected: Ids(e["tokenize_77"]!));
        }
    }

    static Tensor Ids(IEnumerable<long> ids) => torch.tensor(ids.ToArray(), ScalarType.Int64);
    static Tensor Ids(JsonNode array) => Ids(array.AsArray().Select(x => (long)x!));

    /// <summary>The first characters of a text, control characters escaped, for the report.</summary>
    static string Preview(string s)
    {
        var cut = s.Length > 24 ? s[..24] + "…" : s;
        return string.Concat(cut.Select(c => char.IsControl(c) ? $"\\x{(int)c:x2}" : c.ToString()));
    }
}
