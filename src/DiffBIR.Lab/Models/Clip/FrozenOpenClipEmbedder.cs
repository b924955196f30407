using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Clip;

/// <summary>Which hidden state becomes the text condition (official <c>FrozenOpenCLIPEmbedder.layer</c>).</summary>
public enum ClipLayer
{
    /// <summary>After every residual block.</summary>
    Last,
    /// <summary>After all but the last residual block (Stable Diffusion 2.x and DiffBIR).</summary>
    Penultimate,
}

/// <summary>OpenCLIP text tower shape (official <c>CLIPTextCfg</c>); defaults are ViT-H-14's (configs/inference/cldm.yaml).</summary>
public sealed record ClipTextConfig
{
    public int ContextLength { get; init; } = 77;
    public int VocabSize { get; init; } = 49408;
    public int Width { get; init; } = 1024;
    public int Heads { get; init; } = 16;
    public int Layers { get; init; } = 24;
    public double MlpRatio { get; init; } = 4.0;

    public static ClipTextConfig FromJson(JsonNode n)
    {
        // Options the released configs never set would change the architecture; refuse them rather than ignore them.
        foreach (var unsupported in new[] { "ls_init_value", "hf_model_name", "embed_cls" })
            if (n[unsupported] is JsonNode v && v.ToJsonString() is not ("null" or "false"))
                throw new NotSupportedException($"text_cfg.{unsupported} = {v.ToJsonString()} is not supported (DiffBIR's configs do not use it)");
        return new()
        {
            ContextLength = (int?)n["context_length"] ?? 77,
            VocabSize = (int?)n["vocab_size"] ?? 49408,
            Width = (int?)n["width"] ?? 512,
            Heads = (int?)n["heads"] ?? 8,
            Layers = (int?)n["layers"] ?? 12,
            MlpRatio = (double?)n["mlp_ratio"] ?? 4.0,
        };
    }
}

/// <summary>Official <c>clip_cfg</c> (the vision tower is built and deleted by the official code, so only its absence matters).</summary>
public sealed record ClipConfig
{
    /// <summary>Output width of <c>text_projection</c> (unused by DiffBIR, but the parameter is in every checkpoint).</summary>
    public int EmbedDim { get; init; } = 1024;
    public ClipTextConfig Text { get; init; } = new();
    public ClipLayer Layer { get; init; } = ClipLayer.Penultimate;

    /// <summary>OpenCLIP ViT-H-14 text encoder as DiffBIR uses it (354,032,641 values).</summary>
    public static ClipConfig VitH14 { get; } = new();

    public static ClipConfig FromJson(JsonNode n) => new()
    {
        EmbedDim = (int)n["embed_dim"]!,
        Text = ClipTextConfig.FromJson(n["text_cfg"]!),
        Layer = ((string?)n["layer"] ?? "last") switch
        {
            "last" => ClipLayer.Last,
            "penultimate" => ClipLayer.Penultimate,
            var s => throw new NotSupportedException($"clip layer '{s}' (official FrozenOpenCLIPEmbedder accepts last / penultimate)"),
        },
    };
}

/// <summary>
/// Multi-head self-attention with torch's <c>nn.MultiheadAttention</c> parameter layout: one packed
/// <c>in_proj_weight</c> [3·width, width] (q, k, v stacked) and an <c>out_proj</c> Linear.
/// </summary>
public sealed class PackedSelfAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    readonly Parameter in_proj_weight;
    readonly Parameter in_proj_bias;
    readonly Linear out_proj;
    readonly int heads;

    public PackedSelfAttention(int width, int heads) : base("MultiheadAttention")
    {
        if (width % heads != 0) throw new ArgumentException($"width {width} is not divisible by heads {heads}");
        this.heads = heads;
        in_proj_weight = new Parameter(torch.empty(3L * width, width));
        in_proj_bias = new Parameter(torch.zeros(3L * width));
        out_proj = nn.Linear(width, width);
        RegisterComponents();
    }

    /// <param name="x">[N, L, width] (batch first; the official code runs L, N, width — the same arithmetic).</param>
    /// <param name="mask">additive [L, L] mask (−inf where a position may not look), or null.</param>
    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = torch.NewDisposeScope();
        long n = x.shape[0], l = x.shape[1], c = x.shape[2];
        var qkv = nn.functional.linear(x, in_proj_weight, in_proj_bias).reshape(n, l, 3, heads, c / heads).permute(2, 0, 3, 1, 4);
        var o = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask: mask);
        return out_proj.Run(o.transpose(1, 2).reshape(n, l, c)).MoveToOuterDisposeScope();
    }
}

/// <summary>Pre-LayerNorm transformer block (official open_clip <c>ResidualAttentionBlock</c>; no LayerScale in OpenCLIP ViT-H).</summary>
public sealed class ResidualAttentionBlock : nn.Module<Tensor, Tensor?, Tensor>
{
    readonly LayerNorm ln_1;
    readonly PackedSelfAttention attn;
    readonly LayerNorm ln_2;
    readonly Sequential mlp;

    public ResidualAttentionBlock(int width, int heads, double mlpRatio) : base(nameof(ResidualAttentionBlock))
    {
        long hidden = (long)(width * mlpRatio);
        ln_1 = nn.LayerNorm(width);
        attn = new PackedSelfAttention(width, heads);
        ln_2 = nn.LayerNorm(width);
        // Exact (erf) GELU: open_clip uses nn.GELU unless quick_gelu is requested, which ViT-H does not.
        mlp = nn.Sequential(("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = torch.NewDisposeScope();
        x = x + attn.Run(ln_1.forward(x), mask);
        x = x + mlp.forward(ln_2.forward(x));
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>The residual stack (official <c>Transformer</c>; keys <c>transformer.resblocks.i.*</c>).</summary>
public sealed class ClipTransformer : nn.Module
{
    internal readonly ModuleList<ResidualAttentionBlock> resblocks;

    public ClipTransformer(ClipTextConfig c) : base("Transformer")
    {
        resblocks = new ModuleList<ResidualAttentionBlock>(
            Enumerable.Range(0, c.Layers).Select(_ => new ResidualAttentionBlock(c.Width, c.Heads, c.MlpRatio)).ToArray());
        RegisterComponents();
    }
}

/// <summary>
/// What remains of open_clip's <c>CLIP</c> after DiffBIR deletes the vision tower: the text tower plus the unused
/// <c>text_projection</c> and <c>logit_scale</c>, which stay in the state dict (and in every checkpoint).
/// </summary>
public sealed class OpenClipTextModel : nn.Module
{
    internal readonly Parameter positional_embedding;
    internal readonly Parameter text_projection;
    internal readonly Parameter logit_scale;
    internal readonly Embedding token_embedding;
    internal readonly ClipTransformer transformer;
    internal readonly LayerNorm ln_final;

    public OpenClipTextModel(ClipConfig c) : base("CLIP")
    {
        var t = c.Text;
        token_embedding = nn.Embedding(t.VocabSize, t.Width);
        positional_embedding = new Parameter(torch.empty(t.ContextLength, t.Width));
        text_projection = new Parameter(torch.empty(t.Width, c.EmbedDim));
        // log(1/0.07), open_clip's initial temperature; a 0-d parameter.
        logit_scale = new Parameter(torch.full(Array.Empty<long>(), Math.Log(1 / 0.07)));
        transformer = new ClipTransformer(t);
        ln_final = nn.LayerNorm(t.Width);
        // Causal mask: −inf strictly above the diagonal. Non-persistent, as in open_clip: it is rebuilt, never loaded.
        register_buffer("attn_mask", torch.full(t.ContextLength, t.ContextLength, float.NegativeInfinity).triu(1), persistent: false);
        RegisterComponents();
    }

    internal Tensor AttnMask => get_buffer("attn_mask")!;
}

/// <summary>
/// The text condition of Stable Diffusion 2.x / DiffBIR (official <c>diffbir.model.clip.FrozenOpenCLIPEmbedder</c>,
/// ControlLDM's <c>clip</c>): token + position embeddings, causal self-attention blocks — all but the last one in
/// "penultimate" mode — and the final LayerNorm. Output [N, 77, width]; no pooling, no projection.
/// State-dict keys are the official ones (<c>model.*</c>; no <c>model.visual.*</c>, no <c>model.attn_mask</c>).
/// </summary>
public sealed class FrozenOpenClipEmbedder : nn.Module<Tensor, Tensor>
{
    readonly OpenClipTextModel model;

    public ClipConfig Config { get; }
    /// <summary>The BPE tokenizer <see cref="Encode"/> uses (null: only token ids can be encoded).</summary>
    public ClipTokenizer? Tokenizer { get; }

    public FrozenOpenClipEmbedder(ClipConfig? config = null, ClipTokenizer? tokenizer = null) : base(nameof(FrozenOpenClipEmbedder))
    {
        Config = config ?? ClipConfig.VitH14;
        Tokenizer = tokenizer;
        model = new OpenClipTextModel(Config);
        RegisterComponents();
    }

    /// <summary>Hidden states for token ids [N, context_length] (int64) → [N, context_length, width] (official <c>forward</c>).</summary>
    public override Tensor forward(Tensor tokens)
    {
        using var scope = torch.NewDisposeScope();
        var x = model.token_embedding.forward(tokens) + model.positional_embedding;
        var mask = model.AttnMask.to(x.dtype);
        var blocks = model.transformer.resblocks;
        // "penultimate" stops one block early: SD 2.x conditions on the second-to-last hidden state.
        int used = blocks.Count - (Config.Layer == ClipLayer.Penultimate ? 1 : 0);
        for (int i = 0; i < used; i++) x = blocks[i].forward(x, mask);
        return model.ln_final.forward(x).MoveToOuterDisposeScope();
    }

    /// <summary>Tokenizes the prompts (77 ids each) and encodes them (official <c>encode(text)</c>): [N, 77, width].</summary>
    public Tensor Encode(IEnumerable<string> prompts)
    {
        var tok = Tokenizer ?? throw new InvalidOperationException(
            "FrozenOpenClipEmbedder was built without a ClipTokenizer; pass one (bpe_simple_vocab_16e6.txt.gz) to the constructor");
        using var tokens = tok.Tokenize(prompts, Config.Text.ContextLength).to(model.token_embedding.weight!.device);
        return forward(tokens);
    }
}
