using System.Text.Json.Nodes;
using DiffBIR.Lab.Models.Stage1;

namespace DiffBIR.Lab.Metrics.Lpips;

/// <summary>
/// Constructor arguments of <see cref="LpipsMetric"/> (pyiqa <c>pyiqa.archs.lpips_arch.LPIPS</c>; names in brackets).
/// Only the inference configuration pyiqa's <c>lpips</c> / <c>lpips-vgg</c> metrics use is ported: learned linear
/// heads (<c>lpips=True</c>), spatially averaged (<c>spatial=False</c>), no semantic weighting
/// (<c>semantic_weight_layer=-1</c>, i.e. not <c>lpips+</c>).
/// </summary>
/// <param name="Net">Trunk (<c>net</c>): "alex" (torchvision AlexNet features) or "vgg" / "vgg16" (VGG16 features).
/// SqueezeNet is not ported.</param>
/// <param name="Version">"0.1" (default, inputs pass the <see cref="ScalingLayer"/>) or "0.0" (the original release,
/// which skipped it) (<c>version</c>).</param>
/// <param name="UseDropout">Each linear head is Dropout + 1×1 conv (<c>use_dropout</c>, default true); only changes
/// the state-dict keys (<c>linK.model.1.weight</c> vs <c>linK.model.0.weight</c>): Dropout is the identity in eval.</param>
public sealed record LpipsConfig(string Net = "alex", string Version = "0.1", bool UseDropout = true)
{
    /// <summary>pyiqa metric <c>lpips</c>: LPIPS v0.1 on AlexNet (released LPIPS_v0.1_alex-df73285e.pth).</summary>
    public static LpipsConfig Alex { get; } = new("alex");

    /// <summary>pyiqa metric <c>lpips-vgg</c>: LPIPS v0.1 on VGG16 (released LPIPS_v0.1_vgg-a78928a0.pth).</summary>
    public static LpipsConfig Vgg { get; } = new("vgg");

    /// <summary>The configuration pyiqa's <c>DEFAULT_CONFIGS[metric]</c> builds: "lpips" or "lpips-vgg".</summary>
    public static LpipsConfig ForMetric(string metric) => metric switch
    {
        "lpips" => Alex,
        "lpips-vgg" => Vgg,
        _ => throw new ArgumentException($"'{metric}' is not an LPIPS metric this port implements (lpips, lpips-vgg); "
                                         + "lpips+ / lpips-vgg+ (semantic_weight_layer) and squeeze are not ported"),
    };

    /// <summary>Channels of the five trunk outputs (official <c>self.chns</c>).</summary>
    public int[] Channels => IsVgg ? new[] { 64, 128, 256, 512, 512 } : new[] { 64, 192, 384, 256, 256 };

    internal bool IsVgg => Net is "vgg" or "vgg16";

    /// <summary>Smallest height and width the trunk accepts: AlexNet's second max-pool needs a 3×3 input (31 px);
    /// VGG16's fourth max-pool leaves 1×1 at 16 px.</summary>
    public int MinSide => IsVgg ? 16 : 31;

    /// <summary>
    /// Reads the official constructor options (the fixture's <c>metric_opts</c> / pyiqa's <c>DEFAULT_CONFIGS</c> entry);
    /// missing keys take the class defaults. Options that only concern loading or training (<c>type</c>,
    /// <c>pretrained</c>, <c>pnet_rand</c>, <c>pnet_tune</c>, <c>eval_mode</c>) are accepted and ignored.
    /// </summary>
    public static LpipsConfig FromJson(JsonNode node)
    {
        var o = node.AsObject();
        ConfigJson.RejectUnknown(o, "LPIPS", new[] { "type", "net", "version", "use_dropout", "pretrained", "pnet_rand", "pnet_tune", "eval_mode" });
        if (o["type"] is { } t && (string)t! != "LPIPS") throw new ArgumentException($"LPIPS config: type is '{(string)t!}', not 'LPIPS'");
        var c = new LpipsConfig(ConfigJson.String(o, "net", "alex"), ConfigJson.String(o, "version", "0.1"), ConfigJson.Bool(o, "use_dropout", true));
        c.Validate();
        return c;
    }

    internal void Validate()
    {
        if (Net is not ("alex" or "vgg" or "vgg16"))
            throw new ArgumentException($"LPIPS config: net '{Net}' is not ported (alex, vgg)");
        if (Version is not ("0.1" or "0.0"))
            throw new ArgumentException($"LPIPS config: version '{Version}' is unknown (0.1, 0.0)");
    }
}
