using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Pipeline;

/// <summary>
/// The official pipeline's pre- and post-processing (diffbir/pipeline.py, diffbir/utils/common.py), as pure tensor
/// functions on float NCHW images.
/// </summary>
public static class ImageOps
{
    /// <summary>
    /// Bicubic, antialiased resize so the short edge becomes <paramref name="size"/>; the long edge is
    /// <c>int(long · size / short)</c> (truncated, as the official <c>resize_short_edge_to</c>).
    /// </summary>
    public static Tensor ResizeShortEdgeTo(Tensor imgs, int size)
    {
        long h = imgs.shape[2], w = imgs.shape[3];
        long oh, ow;
        if (h == w) (oh, ow) = (size, size);
        else if (h < w) (oh, ow) = (size, (long)(w * ((double)size / h)));
        else (oh, ow) = ((long)(h * ((double)size / w)), size);
        return ResizeBicubic(imgs, oh, ow);
    }

    /// <summary>Bicubic resize with antialiasing (PyTorch <c>F.interpolate(mode="bicubic", antialias=True)</c>).</summary>
    public static Tensor ResizeBicubic(Tensor imgs, long height, long width) =>
        F.interpolate(imgs, new[] { height, width }, mode: InterpolationMode.Bicubic, align_corners: false, antialias: true);

    /// <summary>Zero-pads bottom and right to multiples of <paramref name="multiple"/> (official <c>pad_to_multiples_of</c>).</summary>
    public static Tensor PadToMultiplesOf(Tensor imgs, int multiple)
    {
        long h = imgs.shape[^2], w = imgs.shape[^1];
        if (h % multiple == 0 && w % multiple == 0) return imgs.clone();
        long ph = (h + multiple - 1) / multiple * multiple - h, pw = (w + multiple - 1) / multiple * multiple - w;
        return F.pad(imgs, new[] { 0L, pw, 0L, ph }, PaddingModes.Constant, 0);
    }

    /// <summary>One level of the à-trous wavelet blur: 3×3 binomial kernel, dilation = radius, replicate padding.</summary>
    public static Tensor WaveletBlur(Tensor image, int radius)
    {
        using var scope = torch.NewDisposeScope();
        var k = torch.tensor(new float[] { 0.0625f, 0.125f, 0.0625f, 0.125f, 0.25f, 0.125f, 0.0625f, 0.125f, 0.0625f }, dtype: image.dtype, device: image.device)
            .reshape(1, 1, 3, 3).repeat(image.shape[1], 1, 1, 1);
        var padded = F.pad(image, new long[] { radius, radius, radius, radius }, PaddingModes.Replicate);
        return F.conv2d(padded, k, groups: image.shape[1], dilation: new long[] { radius, radius }).MoveToOuterDisposeScope();
    }

    /// <summary>High- and low-frequency parts after <paramref name="levels"/> wavelet levels (radius 1, 2, 4, …).</summary>
    public static (Tensor High, Tensor Low) WaveletDecomposition(Tensor image, int levels = 5)
    {
        using var scope = torch.NewDisposeScope();
        var high = torch.zeros_like(image);
        var cur = image;
        Tensor low = image;
        for (int i = 0; i < levels; i++)
        {
            low = WaveletBlur(cur, 1 << i);
            high = high + (cur - low);
            cur = low;
        }
        return (high.MoveToOuterDisposeScope(), low.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// The colour fix: the content's high frequencies on the style's low frequencies (5 levels). In the pipeline the
    /// content is the generated image and the style the stage-1 output (official <c>wavelet_reconstruction</c>).
    /// </summary>
    public static Tensor WaveletReconstruction(Tensor content, Tensor style)
    {
        using var scope = torch.NewDisposeScope();
        var (contentHigh, _) = WaveletDecomposition(content);
        var (_, styleLow) = WaveletDecomposition(style);
        return (contentHigh + styleLow).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The end of the official <c>Pipeline.run</c>: colour-fix the decoded sample (in [-1, 1]) against the stage-1
    /// output, resize bicubic-antialiased to the output size, then <c>(x·255).clamp(0,255)</c> truncated to uint8,
    /// as [N, H, W, 3].
    /// </summary>
    public static Tensor Finish(Tensor sample, Tensor condImage, long outHeight, long outWidth)
    {
        using var scope = torch.NewDisposeScope();
        return FinishFloat(sample, condImage, outHeight, outWidth).clamp(0, 255).to(ScalarType.Byte).MoveToOuterDisposeScope();
    }

    /// <summary><see cref="Finish"/> before the uint8 conversion: the colour-fixed, resized image ×255 as float [N, H, W, 3].</summary>
    public static Tensor FinishFloat(Tensor sample, Tensor condImage, long outHeight, long outWidth)
    {
        using var scope = torch.NewDisposeScope();
        var fixedColours = WaveletReconstruction((sample + 1) / 2, condImage);
        var resized = ResizeBicubic(fixedColours, outHeight, outWidth);
        return resized.mul(255.0f).permute(0, 2, 3, 1).contiguous().MoveToOuterDisposeScope();
    }
}
