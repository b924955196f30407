using System.Text.Json.Nodes;
using DiffBIR.Lab.Models.Stage1;

namespace DiffBIR.Lab.Metrics.Maniqa;

/// <summary>
/// The timm <c>VisionTransformer</c> MANIQA uses as its backbone. The official code hard-codes
/// <c>timm.create_model('vit_base_patch8_224')</c> (ViT-B/8: 768 wide, 12 blocks, 12 heads, MLP ratio 4, 1000-class
/// head, class token, learned position embedding, LayerNorm eps 1e-6); the reduced fixtures pass timm's own model
/// kwargs (<c>config.vit.timm_kwargs</c>).
/// </summary>
public sealed record VitConfig(
    int ImgSize = 224, int PatchSize = 8, int InChans = 3, int EmbedDim = 768, int Depth = 12, int NumHeads = 12,
    double MlpRatio = 4.0, int NumClasses = 1000)
{
    /// <summary>timm <c>vit_base_patch8_224</c>.</summary>
    public static VitConfig VitBase8 { get; } = new();

    /// <summary>Tokens per side of the patch grid (img_size / patch_size).</summary>
    public int GridSize => ImgSize / PatchSize;

    /// <summary>timm model kwargs on top of <c>vit_base_patch8_224</c>'s (patch_size, embed_dim, depth, num_heads, ...).</summary>
    public static VitConfig FromTimmKwargs(JsonNode? kwargs)
    {
        if (kwargs is null) return VitBase8;
        var o = kwargs.AsObject();
        ConfigJson.RejectUnknown(o, "timm VisionTransformer", new[]
            { "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes" });
        var d = VitBase8;
        return new VitConfig(
            ConfigJson.Int(o, "img_size", d.ImgSize), ConfigJson.Int(o, "patch_size", d.PatchSize),
            ConfigJson.Int(o, "in_chans", d.InChans), ConfigJson.Int(o, "embed_dim", d.EmbedDim),
            ConfigJson.Int(o, "depth", d.Depth), ConfigJson.Int(o, "num_heads", d.NumHeads),
            ConfigJson.Double(o, "mlp_ratio", d.MlpRatio), ConfigJson.Int(o, "num_classes", d.NumClasses));
    }
}

/// <summary>
/// Constructor arguments of pyiqa's <c>MANIQA</c> (pyiqa/archs/maniqa_arch.py; official names in brackets) plus its
/// ViT backbone. Defaults are the class defaults; <see cref="Koniq"/>, <see cref="Kadid"/> and <see cref="Pipal"/> are
/// the released metrics <c>maniqa</c>, <c>maniqa-kadid</c> and <c>maniqa-pipal</c>.
/// </summary>
/// <param name="EmbedDim">ViT width E (<c>embed_dim</c>); the features are 4E wide (blocks 6..9 concatenated).</param>
/// <param name="NumOutputs">Outputs of the score / weight heads (<c>num_outputs</c>).</param>
/// <param name="PatchSize">ViT patch size (<c>patch_size</c>); the token grid is T = img_size / patch_size.</param>
/// <param name="Depths">Swin blocks per Swin layer (<c>depths</c>).</param>
/// <param name="WindowSize">Swin window side (<c>window_size</c>).</param>
/// <param name="DimMlp">Swin MLP hidden width (<c>dim_mlp</c>, absolute, not a ratio).</param>
/// <param name="NumHeads">Swin attention heads per layer (<c>num_heads</c>).</param>
/// <param name="ImgSize">Crop side the network is built for (<c>img_size</c>); the crops themselves are always 224.</param>
/// <param name="NumTab">Transposed-attention blocks per stage (<c>num_tab</c>).</param>
/// <param name="Scale">Swin residual scale: x = scale·layer(x) + x (<c>scale</c>; 0.8 for koniq / kadid, 0.13 for pipal).</param>
/// <param name="TestSample">Uniform crops per image at inference (<c>test_sample</c>).</param>
/// <param name="Vit">The timm backbone (<c>timm.create_model('vit_base_patch8_224')</c>).</param>
public sealed record ManiqaConfig(
    int EmbedDim = 768, int NumOutputs = 1, int PatchSize = 8, int[]? Depths = null, int WindowSize = 4,
    int DimMlp = 768, int[]? NumHeads = null, int ImgSize = 224, int NumTab = 2, double Scale = 0.13,
    int TestSample = 20, VitConfig? Vit = null)
{
    public int[] Depths { get; init; } = Depths ?? new[] { 2, 2 };
    public int[] NumHeads { get; init; } = NumHeads ?? new[] { 4, 4 };
    public VitConfig Vit { get; init; } = Vit ?? VitConfig.VitBase8;

    /// <summary>Token grid side T (official <c>input_size</c> = img_size // patch_size).</summary>
    public int InputSize => ImgSize / PatchSize;

    /// <summary>pyiqa metric <c>maniqa</c>: trained on KonIQ-10k (ckpt_koniq10k.pt), scale 0.8.</summary>
    public static ManiqaConfig Koniq { get; } = new(Scale: 0.8);
    /// <summary>pyiqa metric <c>maniqa-kadid</c>: trained on KADID-10k (ckpt_kadid10k.pt), scale 0.8.</summary>
    public static ManiqaConfig Kadid { get; } = new(Scale: 0.8);
    /// <summary>pyiqa metric <c>maniqa-pipal</c>: trained on PIPAL (MANIQA_PIPAL-ae6d356b.pth), scale 0.13 (class default).</summary>
    public static ManiqaConfig Pipal { get; } = new();

    /// <summary>
    /// Reads a fixture / registry config: <c>{"metric_opts": {...MANIQA kwargs...}, "vit": {"timm_kwargs": {...}}}</c>,
    /// or a bare MANIQA kwargs object. Missing keys take the class defaults.
    /// </summary>
    public static ManiqaConfig FromJson(JsonNode node)
    {
        var opts = (node["metric_opts"] ?? node).AsObject();
        ConfigJson.RejectUnknown(opts, "MANIQA", new[]
        {
            "embed_dim", "num_outputs", "patch_size", "depths", "window_size", "dim_mlp", "num_heads", "img_size",
            "num_tab", "scale", "test_sample",
            // no effect on the inference network: dropout rate (identity at eval), checkpoint selection, registry key
            "drop", "pretrained", "pretrained_model_path", "train_dataset", "type",
        });
        var vit = VitConfig.FromTimmKwargs(node["vit"]?["timm_kwargs"]);
        var c = new ManiqaConfig(
            ConfigJson.Int(opts, "embed_dim", 768), ConfigJson.Int(opts, "num_outputs", 1),
            ConfigJson.Int(opts, "patch_size", 8), ConfigJson.Ints(opts, "depths", new[] { 2, 2 }),
            ConfigJson.Int(opts, "window_size", 4), ConfigJson.Int(opts, "dim_mlp", 768),
            ConfigJson.Ints(opts, "num_heads", new[] { 4, 4 }), ConfigJson.Int(opts, "img_size", 224),
            ConfigJson.Int(opts, "num_tab", 2), ConfigJson.Double(opts, "scale", 0.13),
            ConfigJson.Int(opts, "test_sample", 20), vit);
        c.Validate();
        return c;
    }

    /// <summary>The ViT's token grid and width must be the ones MANIQA's layers are built for.</summary>
    public void Validate()
    {
        if (Vit.EmbedDim != EmbedDim)
            throw new ArgumentException($"MANIQA config: embed_dim {EmbedDim} differs from the ViT's width {Vit.EmbedDim}");
        if (Vit.GridSize != InputSize)
            throw new ArgumentException($"MANIQA config: token grid img_size/patch_size = {InputSize} differs from the ViT's "
                                        + $"{Vit.ImgSize}/{Vit.PatchSize} = {Vit.GridSize}");
        if (Vit.Depth < 10)
            throw new ArgumentException($"MANIQA config: the features are ViT blocks 6..9, the ViT has only {Vit.Depth}");
        if (Depths.Length != NumHeads.Length)
            throw new ArgumentException($"MANIQA config: depths ({Depths.Length}) and num_heads ({NumHeads.Length}) differ in length");
    }
}
