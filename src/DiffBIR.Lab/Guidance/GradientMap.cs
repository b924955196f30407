using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Guidance;

/// <summary>
/// The weight map of weighted-MSE restoration guidance (paper: W = 1 − G(I_RM); official
/// <c>WeightedMSEGuidance._get_weight</c>): grey = 0.2989R + 0.5870G + 0.1140B, replicate-pad 1, Sobel
/// Gx = [[1,0,−1],[2,0,−2],[1,0,−1]], Gy = [[1,2,1],[0,0,0],[−1,−2,−1]] (cross-correlation), magnitude
/// √(gx² + gy²), the SUM of the magnitudes over each p×p patch (official name "block_mean", but a sum), tanh, and
/// W = 1 − tanh(patch sum) broadcast back to every pixel of the patch. Flat patches get W ≈ 1, edges W → 0.
/// <para>Patch size: the official code fixes p = 2 and raises for odd H or W. Here p is a parameter and sizes that
/// p does not divide are accepted: the patch grid is ⌈H/p⌉ × ⌈W/p⌉, anchored at the top-left, and the last row /
/// column of patches is partial — its sum runs over the pixels that exist (no padding enters the sum, nothing is
/// renormalised). For divisible sizes the result is bit-identical to the official computation.</para>
/// </summary>
public static class GradientMap
{
    public static readonly float[] RgbToGray = { 0.2989f, 0.5870f, 0.1140f };

    /// <summary>Sobel gradient magnitude of the grey image, [N,1,H,W]; <paramref name="image"/> is RGB in [0,1], NCHW.</summary>
    public static Tensor SobelMagnitude(Tensor image)
    {
        if (image.dim() != 4 || image.shape[1] != 3)
            throw new ArgumentException($"the gradient map needs an RGB image [N,3,H,W], got [{string.Join(",", image.shape)}] " +
                                        "(the official code fails the same way for 4-channel latents: use space 'rgb' for weighted MSE)");
        using var scope = torch.NewDisposeScope();
        var k = torch.tensor(RgbToGray, device: image.device).view(1, 3, 1, 1).to(image.dtype);
        var gray = torch.sum(image * k, 1, keepdim: true);
        var gx = torch.tensor(new float[] { 1, 0, -1, 2, 0, -2, 1, 0, -1 }, device: image.device).view(1, 3, 3);
        var gy = torch.tensor(new float[] { 1, 2, 1, 0, 0, 0, -1, -2, -1 }, device: image.device).view(1, 3, 3);
        var g = torch.stack(new[] { gx, gy }).to(image.dtype);           // [2,1,3,3]
        var padded = F.pad(gray, new long[] { 1, 1, 1, 1 }, PaddingModes.Replicate);
        var grad = F.conv2d(padded, g);
        return grad.pow(2).sum(1, keepdim: true).sqrt().MoveToOuterDisposeScope();
    }

    /// <summary>Per-patch sums of a [N,C,H,W] map, broadcast back to [N,C,H,W] (partial edge patches: sum of what exists).</summary>
    public static Tensor PatchSum(Tensor map, int patchSize)
    {
        if (patchSize < 1) throw new ArgumentOutOfRangeException(nameof(patchSize), patchSize, "patch size must be ≥ 1");
        using var scope = torch.NewDisposeScope();
        long n = map.shape[0], c = map.shape[1], h = map.shape[2], w = map.shape[3], p = patchSize;
        long hp = (h + p - 1) / p * p, wp = (w + p - 1) / p * p;
        var m = (hp == h && wp == w) ? map : F.pad(map, new long[] { 0, wp - w, 0, hp - h });   // zeros add nothing
        var blocks = m.view(n, c, hp / p, p, wp / p, p).permute(0, 1, 2, 4, 3, 5).contiguous();
        var sums = blocks.sum(new long[] { -2, -1 }, keepdim: true);
        return sums.MoveToOuterDisposeScope();
    }

    /// <summary>W = 1 − tanh(patch sum of Sobel magnitudes), [N,1,H,W]; <paramref name="image"/> RGB in [0,1].
    /// <paramref name="norm"/> replaces the official patch sum by another normalisation (<see cref="WeightMapNorm"/>);
    /// null or <see cref="WeightMapNorm.Sum"/> is the official map, bit for bit.</summary>
    public static Tensor WeightMap(Tensor image, int patchSize = 2, WeightMapNorm? norm = null)
    {
        using var scope = torch.NewDisposeScope();
        return (1 - GradientStrength(image, patchSize, norm)).MoveToOuterDisposeScope();
    }

    /// <summary>G(I) = tanh(normalised patch statistic of Sobel magnitudes), [N,1,H,W], constant on each patch
    /// (official: tanh of the patch sum); W = 1 − G.</summary>
    public static Tensor GradientStrength(Tensor image, int patchSize = 2, WeightMapNorm? norm = null)
    {
        using var scope = torch.NewDisposeScope();
        var mag = SobelMagnitude(image);
        long n = mag.shape[0], c = mag.shape[1], h = mag.shape[2], w = mag.shape[3], p = patchSize;
        long hp = (h + p - 1) / p * p, wp = (w + p - 1) / p * p;
        var stat = (norm ?? WeightMapNorm.Sum).Apply(mag, patchSize);
        var t = stat.tanh()
            .repeat(1, 1, 1, 1, p, p).permute(0, 1, 2, 4, 3, 5).contiguous()
            .view(n, c, hp, wp);
        if (hp != h || wp != w) t = t[.., .., ..(int)h, ..(int)w];
        return t.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// How the patch statistic of Sobel magnitudes is normalised before tanh in G = tanh(·) (W = 1 − G). The official
/// map sums the magnitudes over each patch, which saturates tanh for patches ≥ 4 on ordinary images (W ≈ 0 almost
/// everywhere), so a patch-size sweep is mostly degenerate; the alternatives keep the map informative:
/// <list type="bullet">
/// <item><c>sum</c> (default, official): tanh(S), S = patch sum. <c>sum:T</c>: tanh(S/T), a temperature T &gt; 0.</item>
/// <item><c>mean</c>: tanh(S/k), k = pixels in the patch (fewer in partial edge patches): independent of the patch size.</item>
/// <item><c>max</c>: tanh(S / max S), the image's largest patch sum (per image of the batch).</item>
/// <item><c>percentile:Q</c>: tanh(S / P_Q(S)), the image's Q-th percentile of patch sums (0 &lt; Q ≤ 100; linear
/// interpolation between order statistics, numpy's default), so a fixed share of the patches is above tanh(1).</item>
/// </list>
/// Per-image divisors are clamped to ≥ 1e-12 (a flat image gives G = 0, W = 1). Text form: <see cref="Parse"/>.
/// </summary>
public sealed record WeightMapNorm(string Name, double Parameter)
{
    public static readonly WeightMapNorm Sum = new("sum", 1.0);
    public static readonly WeightMapNorm Mean = new("mean", 0.0);
    public static readonly WeightMapNorm ImageMax = new("max", 100.0);
    public static WeightMapNorm SumWithTemperature(double temperature) => Check(new("sum", temperature));
    public static WeightMapNorm Percentile(double q) => Check(new("percentile", q));

    /// <summary>The names and their parameters, as error messages list them.</summary>
    public const string Forms = "sum, sum:T (T > 0), mean, max or percentile:Q (0 < Q <= 100)";

    /// <summary>Whether this is the official map (the patch sum, T = 1).</summary>
    public bool IsOfficial => Name == "sum" && Parameter == 1.0;

    /// <summary><c>sum</c>, <c>sum:T</c>, <c>mean</c>, <c>max</c> or <c>percentile:Q</c>; anything else, or a parameter
    /// out of range, is a <see cref="FormatException"/> that names the forms.</summary>
    public static WeightMapNorm Parse(string spec)
    {
        var parts = (spec ?? "").Split(':');
        double? P() => parts.Length == 2 && double.TryParse(parts[1], System.Globalization.NumberStyles.Float,
            System.Globalization.CultureInfo.InvariantCulture, out var d) ? d : null;
        WeightMapNorm? r = (parts[0], parts.Length) switch
        {
            ("sum", 1) => Sum,
            ("sum", 2) => P() is { } t ? new("sum", t) : null,
            ("mean", 1) => Mean,
            ("max", 1) => ImageMax,
            ("percentile", 2) => P() is { } q ? new("percentile", q) : null,
            _ => null,
        };
        if (r is null) throw new FormatException($"'{spec}' is not a weight-map normalisation: expected {Forms}");
        return Check(r, spec);
    }

    static WeightMapNorm Check(WeightMapNorm r, string? spec = null)
    {
        string what = spec ?? r.ToString();
        if (r.Name == "sum" && !(double.IsFinite(r.Parameter) && r.Parameter > 0))
            throw new FormatException($"'{what}': the temperature T of sum:T must be a finite number above 0");
        if (r.Name == "percentile" && !(double.IsFinite(r.Parameter) && r.Parameter > 0 && r.Parameter <= 100))
            throw new FormatException($"'{what}': the percentile Q of percentile:Q must be in (0, 100]");
        return r;
    }

    /// <summary>The text form (<see cref="Parse"/> reads it back).</summary>
    public override string ToString() => Name switch
    {
        "sum" when Parameter == 1.0 => "sum",
        "sum" or "percentile" => $"{Name}:{Parameter.ToString("R", System.Globalization.CultureInfo.InvariantCulture)}",
        _ => Name,
    };

    /// <summary>The normalised patch statistic of <paramref name="magnitude"/> [N,C,H,W], shaped [N,C,H/p,W/p,1,1]
    /// (⌈·⌉ for sizes p does not divide), before tanh.</summary>
    public Tensor Apply(Tensor magnitude, int patchSize)
    {
        using var scope = torch.NewDisposeScope();
        var sum = GradientMap.PatchSum(magnitude, patchSize);
        Tensor r;
        switch (Name)
        {
            case "sum":
                r = Parameter == 1.0 ? sum : sum / Parameter;    // T = 1: the official expression, untouched
                break;
            case "mean":
                using (var ones = torch.ones_like(magnitude)) r = sum / GradientMap.PatchSum(ones, patchSize);
                break;
            case "max":
            case "percentile":
            {
                long n = sum.shape[0];
                var flat = sum.reshape(n, -1);
                var divisor = PercentileOf(flat, Parameter).clamp_min(1e-12).view(n, 1, 1, 1, 1, 1);
                r = sum / divisor;
                break;
            }
            default: throw new InvalidOperationException($"unknown weight-map normalisation '{Name}'");
        }
        return r.MoveToOuterDisposeScope();
    }

    /// <summary>The Q-th percentile of each row of [N,K], [N] (linear interpolation between order statistics).</summary>
    static Tensor PercentileOf(Tensor rows, double q)
    {
        using var scope = torch.NewDisposeScope();
        long k = rows.shape[1];
        var sorted = rows.sort(1).Values;
        double pos = q / 100.0 * (k - 1);
        long lo = (long)Math.Floor(pos), hi = Math.Min(lo + 1, k - 1);
        var a = sorted.select(1, lo);
        var b = sorted.select(1, hi);
        return (a + (b - a) * (pos - lo)).MoveToOuterDisposeScope();
    }
}
