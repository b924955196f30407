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

    /// <summary>W = 1 − tanh(patch sum of Sobel magnitudes), [N,1,H,W]; <paramref name="image"/> RGB in [0,1].</summary>
    public static Tensor WeightMap(Tensor image, int patchSize = 2)
    {
        using var scope = torch.NewDisposeScope();
        var mag = SobelMagnitude(image);
        long n = mag.shape[0], c = mag.shape[1], h = mag.shape[2], w = mag.shape[3], p = patchSize;
        long hp = (h + p - 1) / p * p, wp = (w + p - 1) / p * p;
        var t = PatchSum(mag, patchSize).tanh()
            .repeat(1, 1, 1, 1, p, p).permute(0, 1, 2, 4, 3, 5).contiguous()
            .view(n, c, hp, wp);
        if (hp != h || wp != w) t = t[.., .., ..(int)h, ..(int)w];
        return (1 - t).MoveToOuterDisposeScope();
    }
}
