using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.Clip;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.ClipIqa;

/// <summary>
/// Constructor arguments of OpenAI CLIP with a ModifiedResNet image tower (official <c>clip_model.CLIP</c> as
/// <c>build_model</c> derives them from a state dict; names in brackets). Defaults are RN50's.
/// </summary>
/// <param name="EmbedDim">Joint embedding width (<c>embed_dim</c>; columns of <c>text_projection</c>).</param>
/// <param name="ImageResolution">Training resolution (<c>image_resolution</c>); only sizes the attention pool's
/// positional embedding, (resolution/32)² + 1 rows. Any input size is accepted (the ResNet is fully convolutional).</param>
/// <param name="VisionLayers">Bottlenecks per stage (<c>vision_layers</c>).</param>
/// <param name="VisionWidth">Stem output width (<c>vision_width</c>); the pooled feature is 32× wider.</param>
/// <param name="ContextLength">Text tokens (<c>context_length</c>).</param>
/// <param name="VocabSize">BPE vocabulary (<c>vocab_size</c>).</param>
/// <param name="TransformerWidth">Text width (<c>transformer_width</c>).</param>
/// <param name="TransformerHeads">Text heads (<c>transformer_heads</c>; build_model sets width / 64).</param>
/// <param name="TransformerLayers">Text blocks (<c>transformer_layers</c>).</param>
public sealed record OpenAiClipConfig(
    int EmbedDim = 1024, int ImageResolution = 224, int[]? VisionLayers = null, int VisionWidth = 64,
    int ContextLength = 77, int VocabSize = 49408, int TransformerWidth = 512, int TransformerHeads = 8, int TransformerLayers = 12)
{
    /// <summary><c>vision_layers</c> (RN50: [3, 4, 6, 3]).</summary>
    public int[] VisionLayers { get; init; } = VisionLayers ?? new[] { 3, 4, 6, 3 };

    /// <summary>Attention-pool heads: build_model's <c>vision_width * 32 // 64</c>.</summary>
    public int VisionHeads => VisionWidth * 32 / 64;

    /// <summary>Width of the last ResNet stage and of the attention pool (<c>vision_width * 32</c>).</summary>
    public int PoolWidth => VisionWidth * 32;

    /// <summary>OpenAI's released RN50 (RN50.pt, the default backbone of pyiqa's CLIPIQA).</summary>
    public static OpenAiClipConfig RN50 { get; } = new();

    /// <summary>The <c>CLIP(...)</c> arguments as a JSON object (the fixture's <c>config.clip</c>).</summary>
    public static OpenAiClipConfig FromJson(JsonNode node)
    {
        var o = node.AsObject();
        if (o["vision_patch_size"] is JsonNode p && p.ToJsonString() != "null")
            throw new NotSupportedException("CLIP with a ViT image tower (vision_patch_size set) is not ported; only ModifiedResNet backbones (RN50 …)");
        return new OpenAiClipConfig(
            (int)o["embed_dim"]!, (int)o["image_resolution"]!, o["vision_layers"]!.AsArray().Select(x => (int)x!).ToArray(),
            (int)o["vision_width"]!, (int)o["context_length"]!, (int)o["vocab_size"]!, (int)o["transformer_width"]!,
            (int)o["transformer_heads"]!, (int)o["transformer_layers"]!);
    }
}

/// <summary>
/// ResNet bottleneck with anti-aliased stride (official <c>clip_model.Bottleneck</c>): every conv has stride 1; a
/// stride-s block average-pools (s×s, floor) after conv2 and before the 1×1 conv of its shortcut.
/// </summary>
public sealed class ClipBottleneck : nn.Module<Tensor, Tensor>
{
    const int Expansion = 4;
    readonly Conv2d conv1, conv2, conv3;
    readonly BatchNorm2d bn1, bn2, bn3;
    readonly AvgPool2d? avgpool;
    readonly Sequential? downsample;

    public ClipBottleneck(int inplanes, int planes, int stride = 1) : base("Bottleneck")
    {
        conv1 = nn.Conv2d(inplanes, planes, 1, bias: false);
        bn1 = nn.BatchNorm2d(planes);
        conv2 = nn.Conv2d(planes, planes, 3, padding: 1, bias: false);
        bn2 = nn.BatchNorm2d(planes);
        avgpool = stride > 1 ? nn.AvgPool2d(stride) : null;
        conv3 = nn.Conv2d(planes, planes * Expansion, 1, bias: false);
        bn3 = nn.BatchNorm2d(planes * Expansion);
        if (stride > 1 || inplanes != planes * Expansion)
            // Official keys downsample.0 (conv) and downsample.1 (BatchNorm); "-1" is the parameterless AvgPool2d(stride).
            downsample = nn.Sequential(("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, planes * Expansion, 1, bias: false)),
                ("1", nn.BatchNorm2d(planes * Expansion)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var o = nn.functional.relu(bn1.forward(conv1.forward(x)));
        o = nn.functional.relu(bn2.forward(conv2.forward(o)));
        if (avgpool != null) o = avgpool.forward(o);
        o = bn3.forward(conv3.forward(o));
        var identity = downsample != null ? downsample.forward(x) : x;
        return nn.functional.relu(o + identity).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// CLIP's attention pooling (official <c>clip_model.AttentionPool2d</c> as pyiqa modified it): the tokens are the
/// spatial mean followed by the H·W positions; one multi-head attention layer with separate q/k/v projections; the
/// image feature is the output of the mean token, projected by <c>c_proj</c>.
/// </summary>
public sealed class AttentionPool2d : nn.Module<Tensor, bool, Tensor>
{
    readonly Parameter positional_embedding;
    readonly Linear k_proj, q_proj, v_proj, c_proj;
    readonly int heads;

    public AttentionPool2d(int spacialDim, int embedDim, int heads, int outputDim) : base(nameof(AttentionPool2d))
    {
        this.heads = heads;
        positional_embedding = new Parameter(torch.empty((long)spacialDim * spacialDim + 1, embedDim));
        k_proj = nn.Linear(embedDim, embedDim);
        q_proj = nn.Linear(embedDim, embedDim);
        v_proj = nn.Linear(embedDim, embedDim);
        c_proj = nn.Linear(embedDim, outputDim);
        RegisterComponents();
    }

    /// <summary>
    /// The positional embedding [S²+1, C] resampled to [tokens, C] as pyiqa does for <c>pos_embedding=True</c>:
    /// <c>F.interpolate(pe[None, None], size=(tokens, C), mode='bicubic', align_corners=False)</c>, i.e. a 1-D bicubic
    /// resample along the flattened token axis (class row included); the channel axis keeps its size, so it is
    /// untouched.
    /// </summary>
    public Tensor ResizedPositionalEmbedding(long tokens)
    {
        using var pe = positional_embedding.unsqueeze(0).unsqueeze(0);
        using var r = nn.functional.interpolate(pe, new[] { tokens, positional_embedding.shape[1] }, mode: InterpolationMode.Bicubic, align_corners: false);
        return r.squeeze(0).squeeze(0);
    }

    /// <param name="x">[N, C, H, W], the last ResNet stage.</param>
    /// <param name="posEmbedding">pyiqa's <c>pos_embedding</c>: add the resampled positional embedding. False (metric
    /// 'clipiqa' and 'clipiqa+') adds NO positional information at all.</param>
    /// <returns>[N, output_dim]</returns>
    public override Tensor forward(Tensor x, bool posEmbedding)
    {
        using var scope = torch.NewDisposeScope();
        long n = x.shape[0], c = x.shape[1];
        var t = x.reshape(n, c, -1).transpose(1, 2);                    // [N, HW, C]
        t = torch.cat(new[] { t.mean(new long[] { 1 }, keepdim: true), t }, 1); // [N, HW+1, C]
        if (posEmbedding) t = t + ResizedPositionalEmbedding(t.shape[1]).to(t.dtype);
        long l = t.shape[1], hd = c / heads;
        // Only the output of token 0 is used, and every query row is computed independently: query token 0 alone.
        var q = q_proj.forward(t.narrow(1, 0, 1)).reshape(n, 1, heads, hd).transpose(1, 2); // [N, h, 1, hd]
        var k = k_proj.forward(t).reshape(n, l, heads, hd).transpose(1, 2);                  // [N, h, L, hd]
        var v = v_proj.forward(t).reshape(n, l, heads, hd).transpose(1, 2);
        // torch.nn.functional.multi_head_attention_forward (1.13): q / sqrt(hd), softmax(q kᵀ), · v.
        var attn = torch.matmul(q / Math.Sqrt(hd), k.transpose(-2, -1)).softmax(-1);
        var o = torch.matmul(attn, v).transpose(1, 2).reshape(n, c);
        return c_proj.forward(o).MoveToOuterDisposeScope();
    }
}

/// <summary>The ResNet stages of one forward pass (official <c>forward_features</c>) and the pooled feature.</summary>
public sealed record ClipVisualOutput(Tensor Stem, Tensor Layer1, Tensor Layer2, Tensor Layer3, Tensor Layer4, Tensor Pooled) : IDisposable
{
    public void Dispose()
    {
        foreach (var t in new[] { Stem, Layer1, Layer2, Layer3, Layer4, Pooled }) t.Dispose();
    }
}

/// <summary>
/// CLIP's image tower for RN50 and its siblings (official <c>clip_model.ModifiedResNet</c>): a 3-conv stem with an
/// average pool, four stages of anti-aliased bottlenecks, and attention pooling instead of global average pooling.
/// Input: normalised image [N, 3, H, W] at any size whose stages stay non-empty (each side ≥ 31 px).
/// </summary>
public sealed class ModifiedResNet : nn.Module<Tensor, bool, Tensor>
{
    readonly Conv2d conv1, conv2, conv3;
    readonly BatchNorm2d bn1, bn2, bn3;
    readonly AvgPool2d avgpool;
    readonly Sequential layer1, layer2, layer3, layer4;
    internal readonly AttentionPool2d attnpool;

    public ModifiedResNet(int[] layers, int outputDim, int heads, int inputResolution = 224, int width = 64) : base(nameof(ModifiedResNet))
    {
        if (layers.Length != 4) throw new ArgumentException($"ModifiedResNet needs 4 stage depths, got {layers.Length}");
        conv1 = nn.Conv2d(3, width / 2, 3, stride: 2, padding: 1, bias: false);
        bn1 = nn.BatchNorm2d(width / 2);
        conv2 = nn.Conv2d(width / 2, width / 2, 3, padding: 1, bias: false);
        bn2 = nn.BatchNorm2d(width / 2);
        conv3 = nn.Conv2d(width / 2, width, 3, padding: 1, bias: false);
        bn3 = nn.BatchNorm2d(width);
        avgpool = nn.AvgPool2d(2);
        int inplanes = width;
        Sequential Stage(int planes, int blocks, int stride)
        {
            var mods = new List<(string, nn.Module<Tensor, Tensor>)> { ("0", new ClipBottleneck(inplanes, planes, stride)) };
            inplanes = planes * 4;
            for (int i = 1; i < blocks; i++) mods.Add((i.ToString(), new ClipBottleneck(inplanes, planes)));
            return nn.Sequential(mods);
        }
        layer1 = Stage(width, layers[0], 1);
        layer2 = Stage(width * 2, layers[1], 2);
        layer3 = Stage(width * 4, layers[2], 2);
        layer4 = Stage(width * 8, layers[3], 2);
        attnpool = new AttentionPool2d(inputResolution / 32, width * 32, heads, outputDim);
        RegisterComponents();
    }

    /// <summary>Smallest input side that leaves the last stage non-empty (stride 2 conv, then four 2× floors).</summary>
    public const int MinSide = 31;

    /// <summary>Every stage's output and the pooled feature (official <c>forward_features</c> + <c>attnpool</c>).</summary>
    public ClipVisualOutput Features(Tensor x, bool posEmbedding)
    {
        using var scope = torch.NewDisposeScope();
        if (x.shape[2] < MinSide || x.shape[3] < MinSide)
            throw new ArgumentException($"CLIP ResNet input {x.shape[2]}×{x.shape[3]}: each side must be at least {MinSide} px (the network downsamples 32×)");
        var h = nn.functional.relu(bn1.forward(conv1.forward(x)));
        h = nn.functional.relu(bn2.forward(conv2.forward(h)));
        h = nn.functional.relu(bn3.forward(conv3.forward(h)));
        var stem = avgpool.forward(h);
        var l1 = layer1.forward(stem);
        var l2 = layer2.forward(l1);
        var l3 = layer3.forward(l2);
        var l4 = layer4.forward(l3);
        var pooled = attnpool.forward(l4, posEmbedding);
        foreach (var t in new[] { stem, l1, l2, l3, l4, pooled }) t.MoveToOuterDisposeScope();
        return new ClipVisualOutput(stem, l1, l2, l3, l4, pooled);
    }

    /// <returns>the image feature [N, output_dim] (official <c>forward</c>).</returns>
    public override Tensor forward(Tensor x, bool posEmbedding)
    {
        using var f = Features(x, posEmbedding);
        return f.Pooled.alias();
    }
}

/// <summary>x·σ(1.702x), the GELU approximation OpenAI CLIP was trained with (official <c>QuickGELU</c>).</summary>
public sealed class QuickGelu : nn.Module<Tensor, Tensor>
{
    public QuickGelu() : base("QuickGELU") { }

    public override Tensor forward(Tensor x)
    {
        using var s = torch.sigmoid(1.702 * x);
        return x * s;
    }
}

/// <summary>Pre-LN text block of OpenAI CLIP (official <c>clip_model.ResidualAttentionBlock</c>): QuickGELU MLP, LayerNorm eps 1e-5.</summary>
public sealed class OpenAiResidualAttentionBlock : nn.Module<Tensor, Tensor?, Tensor>
{
    readonly PackedSelfAttention attn;
    readonly LayerNorm ln_1, ln_2;
    readonly Sequential mlp;

    public OpenAiResidualAttentionBlock(int width, int heads) : base("ResidualAttentionBlock")
    {
        attn = new PackedSelfAttention(width, heads);
        ln_1 = nn.LayerNorm(width);
        mlp = nn.Sequential(("c_fc", nn.Linear(width, width * 4)), ("gelu", new QuickGelu()), ("c_proj", nn.Linear(width * 4, width)));
        ln_2 = nn.LayerNorm(width);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = torch.NewDisposeScope();
        x = x + attn.forward(ln_1.forward(x), mask);
        x = x + mlp.forward(ln_2.forward(x));
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>The text block stack (official <c>clip_model.Transformer</c>; keys <c>transformer.resblocks.i.*</c>).</summary>
public sealed class OpenAiTextTransformer : nn.Module<Tensor, Tensor?, Tensor>
{
    readonly ModuleList<OpenAiResidualAttentionBlock> resblocks;

    public OpenAiTextTransformer(int width, int layers, int heads) : base("Transformer")
    {
        resblocks = new ModuleList<OpenAiResidualAttentionBlock>(
            Enumerable.Range(0, layers).Select(_ => new OpenAiResidualAttentionBlock(width, heads)).ToArray());
        RegisterComponents();
    }

    /// <param name="x">[N, L, width] (batch first; the official code runs L, N, width — the same arithmetic).</param>
    /// <param name="mask">additive [L, L] mask or null.</param>
    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = torch.NewDisposeScope();
        foreach (var b in resblocks) x = b.forward(x, mask);
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// OpenAI CLIP with a ModifiedResNet image tower (official <c>pyiqa.archs.clip_model.CLIP</c>, a copy of
/// openai/CLIP's model.py). State-dict keys are the official ones: <c>visual.*</c>, <c>transformer.resblocks.*</c>,
/// <c>token_embedding.weight</c>, <c>positional_embedding</c>, <c>ln_final.*</c>, <c>text_projection</c>,
/// <c>logit_scale</c> (the causal mask is not in the state dict). The module is built in eval mode, as
/// <c>build_model</c> returns it; load weights with <see cref="LoadStateDict"/>.
/// </summary>
public sealed class OpenAiClip : nn.Module
{
    internal readonly ModifiedResNet visual;
    internal readonly OpenAiTextTransformer transformer;
    internal readonly Embedding token_embedding;
    internal readonly Parameter positional_embedding;
    internal readonly LayerNorm ln_final;
    internal readonly Parameter text_projection;
    internal readonly Parameter logit_scale;

    public OpenAiClipConfig Config { get; }

    public OpenAiClip(OpenAiClipConfig? config = null) : base("CLIP")
    {
        var c = Config = config ?? OpenAiClipConfig.RN50;
        visual = new ModifiedResNet(c.VisionLayers, c.EmbedDim, c.VisionHeads, c.ImageResolution, c.VisionWidth);
        transformer = new OpenAiTextTransformer(c.TransformerWidth, c.TransformerLayers, c.TransformerHeads);
        token_embedding = nn.Embedding(c.VocabSize, c.TransformerWidth);
        positional_embedding = new Parameter(torch.empty(c.ContextLength, c.TransformerWidth));
        ln_final = nn.LayerNorm(c.TransformerWidth);
        text_projection = new Parameter(torch.empty(c.TransformerWidth, c.EmbedDim));
        logit_scale = new Parameter(torch.full(Array.Empty<long>(), Math.Log(1 / 0.07)));
        // −inf strictly above the diagonal; a plain attribute in the official code, so not in the state dict.
        register_buffer("attn_mask", torch.full(c.ContextLength, c.ContextLength, float.NegativeInfinity).triu(1), persistent: false);
        RegisterComponents();
        eval();
    }

    internal Tensor AttnMask => get_buffer("attn_mask")!;

    /// <summary>Image features [N, embed_dim] of a normalised image (official <c>encode_image</c>).</summary>
    public ClipVisualOutput EncodeImage(Tensor image, bool posEmbedding) => visual.Features(image, posEmbedding);

    /// <summary>Text features [N, embed_dim] of token ids [N, context] (official <c>encode_text</c>): the EOT row (the
    /// row's largest id) after ln_final, times <c>text_projection</c>.</summary>
    public Tensor EncodeText(Tensor tokens)
    {
        using var scope = torch.NewDisposeScope();
        var x = token_embedding.forward(tokens.to(ScalarType.Int64));
        return EncodeTextEmbeddings(x, tokens).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The text tower from token embeddings [N, context, width] (what <c>encode_text</c> does after the lookup, and
    /// what pyiqa's <c>PromptLearner.forward</c> does with learned ones): + positional embedding, causal blocks,
    /// ln_final, the row at <c>tokens.argmax(-1)</c> (the EOT position), @ text_projection.
    /// </summary>
    public Tensor EncodeTextEmbeddings(Tensor embeddings, Tensor tokens)
    {
        using var scope = torch.NewDisposeScope();
        // Official: prompts + positional_embedding.type(clip.dtype) (type promotion gives CLIP's dtype).
        var x = embeddings.to(positional_embedding.dtype) + positional_embedding;
        x = transformer.forward(x, AttnMask.to(x.dtype));
        x = ln_final.forward(x);
        var eot = tokens.to(ScalarType.Int64).argmax(-1);
        x = x[torch.arange(x.shape[0], device: x.device), eot];
        return x.matmul(text_projection).MoveToOuterDisposeScope();
    }

    /// <summary>exp(logit_scale) · normalise(image) @ normalise(text)ᵀ: [N_image, N_text] (official <c>CLIP.forward</c>).</summary>
    public Tensor LogitsPerImage(Tensor imageFeatures, Tensor textFeatures)
    {
        using var scope = torch.NewDisposeScope();
        var img = imageFeatures / imageFeatures.norm(-1, keepdim: true);
        var txt = textFeatures / textFeatures.norm(-1, keepdim: true);
        // Python evaluates `logit_scale * image_features @ text_features.t()` left to right.
        return (logit_scale.exp() * img).matmul(txt.t()).MoveToOuterDisposeScope();
    }

    /// <summary>Token embeddings of ids (the lookup <c>token_embedding(ids)</c>).</summary>
    public Tensor EmbedTokens(Tensor tokens) => token_embedding.forward(tokens.to(ScalarType.Int64));

    /// <summary>Keys <c>build_model</c> deletes from a released archive's state dict before loading.</summary>
    public static readonly IReadOnlyList<string> IgnoredKeys = new[] { "input_resolution", "context_length", "vocab_size" };

    /// <summary>
    /// The state-dict keys the official loader rounds to float16 (<c>convert_weights</c> before
    /// <c>load_state_dict</c>, then <c>model.float()</c>): Conv/Linear weights and biases, the packed attention
    /// projections and <c>text_projection</c>. BatchNorm, LayerNorm, embeddings and <c>logit_scale</c> stay float32.
    /// </summary>
    public IReadOnlySet<string> HalfRoundedKeys()
    {
        var keys = new HashSet<string>(StringComparer.Ordinal) { "text_projection" };
        foreach (var (name, m) in named_modules())
        {
            if (m is Conv2d or Linear) { keys.Add(name + ".weight"); keys.Add(name + ".bias"); }
            if (m is PackedSelfAttention) { keys.Add(name + ".in_proj_weight"); keys.Add(name + ".in_proj_bias"); }
        }
        var present = state_dict().Keys.ToHashSet(StringComparer.Ordinal);
        keys.IntersectWith(present);
        return keys;
    }

    /// <summary>
    /// Loads an OpenAI CLIP state dict by its official keys as pyiqa's <c>clip_model.load</c> does: the keys
    /// <see cref="IgnoredKeys"/> are dropped, and the <see cref="HalfRoundedKeys"/> pass through float16 (a no-op for
    /// the released fp16 archives and for the fixtures, whose stored weights are already rounded).
    /// </summary>
    public LoadReport LoadStateDict(IReadOnlyDictionary<string, Tensor> sd, bool strict = true, string sourceName = "CLIP state dict")
    {
        using var scope = torch.NewDisposeScope();
        var rounded = HalfRoundedKeys();
        var src = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (k, t) in sd)
        {
            if (IgnoredKeys.Contains(k)) continue;
            src[k] = rounded.Contains(k) ? t.to(ScalarType.Float16).to(ScalarType.Float32) : t;
        }
        return StateDictLoader.Load(this, src, strict, sourceName);
    }
}
