using System.Text.Json.Nodes;
using DiffBIR.Lab.Models.Stage1;

namespace DiffBIR.Lab.Metrics.Musiq;

/// <summary>
/// Constructor arguments of pyiqa's <c>MUSIQ</c> (pyiqa/archs/musiq_arch.py; names in brackets). The defaults are the
/// official ones; the same values drive the multi-scale preprocessing (pyiqa's <c>data_preprocess_opts</c>).
/// </summary>
/// <param name="PatchSize">Patch side P in pixels (<c>patch_size</c>); also the patch stride.</param>
/// <param name="NumClass">Head outputs (<c>num_class</c>): 1 = a raw MOS (KonIQ, SPAQ, PaQ-2-PiQ), 10 = an AVA score
/// distribution (Linear + Softmax, mapped to a mean score Σ i·pᵢ).</param>
/// <param name="HiddenSize">Transformer width (<c>hidden_size</c>).</param>
/// <param name="MlpDim">Transformer MLP width (<c>mlp_dim</c>).</param>
/// <param name="NumHeads">Attention heads (<c>num_heads</c>).</param>
/// <param name="NumLayers">Transformer blocks (<c>num_layers</c>).</param>
/// <param name="NumScales">Rows of the scale embedding (<c>num_scales</c>): the resized scales plus the original.</param>
/// <param name="SpatialPosGridSize">Side G of the hashed spatial position grid (<c>spatial_pos_grid_size</c>).</param>
/// <param name="LongerSideLengths">Longer side of each resized scale (<c>longer_side_lengths</c>); used sorted ascending.</param>
/// <param name="MaxSeqLenFromOriginalRes">Tokens of the original-resolution scale (<c>max_seq_len_from_original_res</c>):
/// −1 = all its patches, k ≥ 0 = padded or cut to k, null = the original resolution is not used.</param>
/// <param name="UseScaleEmb">Add the scale embedding (<c>use_scale_emb</c>).</param>
public sealed record MusiqConfig(
    int PatchSize = 32, int NumClass = 1, int HiddenSize = 384, int MlpDim = 1152, int NumHeads = 6, int NumLayers = 14,
    int NumScales = 3, int SpatialPosGridSize = 10, int[]? LongerSideLengths = null, int? MaxSeqLenFromOriginalRes = -1,
    bool UseScaleEmb = true)
{
    /// <summary><c>longer_side_lengths</c> (official default [224, 384]).</summary>
    public int[] LongerSideLengths { get; init; } = LongerSideLengths ?? new[] { 224, 384 };

    /// <summary>The released 'musiq' metric (MUSIQ(pretrained='koniq10k'); musiq_koniq_ckpt-e95806b9.pth). Also the
    /// shape of 'musiq-spaq' and 'musiq-paq2piq'.</summary>
    public static MusiqConfig Koniq { get; } = new();

    /// <summary>The released 'musiq-ava' metric (MUSIQ(pretrained='ava') forces num_class = 10; musiq_ava_ckpt-e8d3f067.pth).</summary>
    public static MusiqConfig Ava { get; } = new(NumClass: 10);

    /// <summary>
    /// Reads the official constructor arguments (pyiqa's <c>metric_opts</c>); missing keys take the class defaults. As
    /// the official constructor does, <c>pretrained</c> = true or 'ava' without a <c>pretrained_model_path</c> forces
    /// num_class = 10 (nothing is downloaded here: load the weights with <c>StateDictLoader</c>).
    /// </summary>
    public static MusiqConfig FromJson(JsonNode node)
    {
        var o = node.AsObject();
        ConfigJson.RejectUnknown(o, "MUSIQ", new[]
        {
            "type", "patch_size", "num_class", "hidden_size", "mlp_dim", "num_heads", "num_layers", "num_scales",
            "spatial_pos_grid_size", "use_scale_emb", "longer_side_lengths", "max_seq_len_from_original_res",
            // no effect on the network in eval mode (dropout), or used only to fetch weights
            "attention_dropout_rate", "dropout_rate", "use_sinusoid_pos_emb", "pretrained", "pretrained_model_path",
        });
        if (o["use_sinusoid_pos_emb"] is { } sin && sin.ToJsonString() == "true")
            throw new NotSupportedException("MUSIQ use_sinusoid_pos_emb = true: the official code ignores it; refusing to guess");
        var numClass = ConfigJson.Int(o, "num_class", 1);
        var pretrained = o["pretrained"]?.ToJsonString() ?? "true"; // official default pretrained=True
        if (o["pretrained_model_path"] is null && pretrained is "true" or "\"ava\"") numClass = 10;
        int? maxOrig = o.ContainsKey("max_seq_len_from_original_res")
            ? o["max_seq_len_from_original_res"] is { } m ? (int)m : null
            : -1;
        return new MusiqConfig(
            ConfigJson.Int(o, "patch_size", 32), numClass, ConfigJson.Int(o, "hidden_size", 384), ConfigJson.Int(o, "mlp_dim", 1152),
            ConfigJson.Int(o, "num_heads", 6), ConfigJson.Int(o, "num_layers", 14), ConfigJson.Int(o, "num_scales", 3),
            ConfigJson.Int(o, "spatial_pos_grid_size", 10), ConfigJson.Ints(o, "longer_side_lengths", new[] { 224, 384 }),
            maxOrig, ConfigJson.Bool(o, "use_scale_emb", true));
    }
}
