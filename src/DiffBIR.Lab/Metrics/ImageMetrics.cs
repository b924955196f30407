using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Metrics;

/// <summary>
/// Fidelity metrics as the official code and the usual evaluation tools compute them, for quality–fidelity studies.
/// PSNR: <c>diffbir.utils.common.calculate_psnr_pt</c> (BasicSR); SSIM: <c>skimage.metrics.structural_similarity</c>
/// with the Wang et al. settings (gaussian σ = 1.5, population covariance). All in float64.
/// </summary>
public static class ImageMetrics
{
    // rgb2ycbcr_pt builds its weights as a float32 tensor, so the coefficients are the float32-rounded values even
    // for float64 input; matching the official Y to 1e-12 needs exactly these.
    static readonly double[] YWeights = { (double)65.481f, (double)128.553f, (double)24.966f };

    /// <summary>BT.601 studio-swing luma Y = (65.481 R + 128.553 G + 24.966 B + 16) / 255 of NCHW RGB in [0,1] → [N,1,H,W].</summary>
    public static Tensor RgbToY(Tensor rgb)
    {
        using var scope = torch.NewDisposeScope();
        var w = torch.tensor(YWeights, ScalarType.Float64).reshape(3, 1).to(rgb.dtype, rgb.device);
        var y = torch.matmul(rgb.permute(0, 2, 3, 1), w).permute(0, 3, 1, 2) + 16.0;
        return (y / 255.0).MoveToOuterDisposeScope();
    }

    // A uint8 image read as [0, 1] gives a plausible-looking wrong number (PSNR ≈ 0 dB, SSIM near 1): refuse it here.
    static void RequireFloatNchw(Tensor a, Tensor b, string metric)
    {
        foreach (var t in new[] { a, b })
        {
            if (!t.is_floating_point())
                throw new ArgumentException($"{metric}: expects float NCHW images in [0, 1], got {t.dtype} [{string.Join(",", t.shape)}]; "
                                            + "for uint8 NHWC images use ImageIO.FromUInt8 or Metric.Get(\"psnr\" / \"ssim\")");
            if (t.dim() != 4)
                throw new ArgumentException($"{metric}: expects NCHW images [N, C, H, W], got [{string.Join(",", t.shape)}]");
        }
    }

    static Tensor Crop(Tensor x, int c) => c == 0 ? x : x[.., .., c..^c, c..^c];

    /// <summary>Mean squared error per image, as inside <see cref="Psnr"/> (after the optional crop and Y conversion).</summary>
    public static Tensor Mse(Tensor a, Tensor b, int cropBorder = 0, bool yChannel = false)
    {
        RequireFloatNchw(a, b, "PSNR/MSE");
        if (!a.shape.SequenceEqual(b.shape))
            throw new ArgumentException($"image shapes differ: [{string.Join(",", a.shape)}] vs [{string.Join(",", b.shape)}]");
        using var scope = torch.NewDisposeScope();
        var x = Crop(a, cropBorder); var y = Crop(b, cropBorder);
        if (yChannel) { x = RgbToY(x); y = RgbToY(y); }
        x = x.to(ScalarType.Float64); y = y.to(ScalarType.Float64);
        return (x - y).pow(2).mean(new long[] { 1, 2, 3 }).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// PSNR per image in dB of NCHW images in [0,1]: 10·log10(1 / (mse + 1e-8)) — the official epsilon caps identical
    /// images at 80 dB. Peak 1 also for Y.
    /// </summary>
    public static Tensor Psnr(Tensor a, Tensor b, int cropBorder = 0, bool yChannel = false)
    {
        using var scope = torch.NewDisposeScope();
        var mse = Mse(a, b, cropBorder, yChannel);
        return (10.0 * torch.log10(1.0 / (mse + 1e-8))).MoveToOuterDisposeScope();
    }

    /// <summary>The 1-D gaussian of scipy.ndimage (σ, truncate 3.5 → radius 5 for σ = 1.5), normalised.</summary>
    static Tensor Gaussian1D(double sigma, double truncate, Device device)
    {
        int radius = (int)(truncate * sigma + 0.5);
        var k = Enumerable.Range(-radius, 2 * radius + 1).Select(x => Math.Exp(-0.5 * x * x / (sigma * sigma))).ToArray();
        double s = k.Sum();
        return torch.tensor(k.Select(v => v / s).ToArray(), ScalarType.Float64, device);
    }

    /// <summary>
    /// SSIM per image (mean over channels) of NCHW images whose values span <paramref name="dataRange"/> (1 for [0,1],
    /// 255 for 8-bit levels). Local statistics use a separable gaussian window (σ = 1.5, 11×11) and are averaged over
    /// the positions where the window lies inside the image — skimage's crop of (win−1)/2 at each border, so no
    /// padding convention enters.
    /// </summary>
    public static Tensor Ssim(Tensor a, Tensor b, double dataRange = 1.0, double sigma = 1.5)
    {
        RequireFloatNchw(a, b, "SSIM");
        if (!a.shape.SequenceEqual(b.shape))
            throw new ArgumentException($"image shapes differ: [{string.Join(",", a.shape)}] vs [{string.Join(",", b.shape)}]");
        using var scope = torch.NewDisposeScope();
        var x = a.to(ScalarType.Float64); var y = b.to(ScalarType.Float64);
        long n = x.shape[0], c = x.shape[1];
        var g = Gaussian1D(sigma, 3.5, x.device);
        int win = (int)g.shape[0];
        if (x.shape[2] < win || x.shape[3] < win) throw new ArgumentException($"images must be at least {win}×{win} for SSIM");
        var gh = g.reshape(1, 1, 1, win).repeat(c, 1, 1, 1);
        var gv = g.reshape(1, 1, win, 1).repeat(c, 1, 1, 1);
        Tensor Filter(Tensor t) => F.conv2d(F.conv2d(t, gh, groups: c), gv, groups: c);
        var ux = Filter(x); var uy = Filter(y);
        var uxx = Filter(x * x); var uyy = Filter(y * y); var uxy = Filter(x * y);
        var vx = uxx - ux * ux; var vy = uyy - uy * uy; var vxy = uxy - ux * uy;
        double c1 = Math.Pow(0.01 * dataRange, 2), c2 = Math.Pow(0.03 * dataRange, 2);
        var s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
        return s.mean(new long[] { 2, 3 }).mean(new long[] { 1 }).MoveToOuterDisposeScope();
    }
}
