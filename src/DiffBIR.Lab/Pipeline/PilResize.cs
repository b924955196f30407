using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Pipeline;

/// <summary>
/// Pillow's <c>Image.resize(size, Image.BICUBIC)</c> on 8-bit RGB, which the official inference loops apply to the
/// low-quality input before SwinIR / SCUNet (<c>lq.resize(tuple(int(x * upscale) for x in lq.size), BICUBIC)</c>).
/// Re-implemented from Pillow's Resample.c: separable convolution, horizontal pass first, bicubic a = −0.5 with the
/// support widened by the scale when shrinking, coefficients normalised then rounded to 22-bit fixed point, and the
/// intermediate image rounded and clipped to uint8 — so results equal Pillow's, not torch's bicubic.
/// </summary>
public static class PilResize
{
    const int PrecisionBits = 32 - 8 - 2;

    static double Bicubic(double x)
    {
        const double a = -0.5;
        if (x < 0) x = -x;
        if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
        if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
        return 0;
    }

    /// <summary>Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis.</summary>
    static (int[] Min, int[] Count, int[][] K) Coeffs(int inSize, int outSize)
    {
        double scale = (double)inSize / outSize;
        double filterscale = Math.Max(scale, 1.0);
        double support = 2.0 * filterscale;
        var mins = new int[outSize]; var counts = new int[outSize]; var ks = new int[outSize][];
        for (int xx = 0; xx < outSize; xx++)
        {
            double center = (xx + 0.5) * scale;
            double ss = 1.0 / filterscale;
            int xmin = (int)(center - support + 0.5); if (xmin < 0) xmin = 0;
            int xmax = (int)(center + support + 0.5); if (xmax > inSize) xmax = inSize; xmax -= xmin;
            var w = new double[xmax];
            double ww = 0;
            for (int x = 0; x < xmax; x++) { w[x] = Bicubic((x + xmin - center + 0.5) * ss); ww += w[x]; }
            var k = new int[xmax];
            for (int x = 0; x < xmax; x++)
            {
                double v = ww != 0 ? w[x] / ww : w[x];
                k[x] = (int)(v * (1 << PrecisionBits) + (v < 0 ? -0.5 : 0.5));
            }
            mins[xx] = xmin; counts[xx] = xmax; ks[xx] = k;
        }
        return (mins, counts, ks);
    }

    static byte Clip8(long v)
    {
        long s = v >> PrecisionBits;
        return s < 0 ? (byte)0 : s > 255 ? (byte)255 : (byte)s;
    }

    /// <summary>Resizes uint8 images [N, H, W, C] to [N, outH, outW, C] as Pillow's BICUBIC does.</summary>
    public static Tensor Resize(Tensor imagesNhwc, int outHeight, int outWidth)
    {
        if (imagesNhwc.dtype != ScalarType.Byte) throw new ArgumentException("PilResize expects uint8 [N, H, W, C] images");
        int n = (int)imagesNhwc.shape[0], h = (int)imagesNhwc.shape[1], w = (int)imagesNhwc.shape[2], c = (int)imagesNhwc.shape[3];
        var src = imagesNhwc.contiguous().data<byte>().ToArray();
        var result = new byte[(long)n * outHeight * outWidth * c];
        for (int b = 0; b < n; b++)
        {
            var img = new byte[h * w * c];
            Array.Copy(src, (long)b * h * w * c, img, 0, img.Length);
            int curW = w;
            if (outWidth != w)
            {
                var (mn, cnt, k) = Coeffs(w, outWidth);
                var o = new byte[h * outWidth * c];
                for (int y = 0; y < h; y++)
                    for (int x = 0; x < outWidth; x++)
                        for (int ch = 0; ch < c; ch++)
                        {
                            long ss = 1L << (PrecisionBits - 1);
                            for (int i = 0; i < cnt[x]; i++) ss += img[(y * w + mn[x] + i) * c + ch] * (long)k[x][i];
                            o[(y * outWidth + x) * c + ch] = Clip8(ss);
                        }
                img = o; curW = outWidth;
            }
            if (outHeight != h)
            {
                var (mn, cnt, k) = Coeffs(h, outHeight);
                var o = new byte[outHeight * curW * c];
                for (int y = 0; y < outHeight; y++)
                    for (int x = 0; x < curW; x++)
                        for (int ch = 0; ch < c; ch++)
                        {
                            long ss = 1L << (PrecisionBits - 1);
                            for (int i = 0; i < cnt[y]; i++) ss += img[((mn[y] + i) * curW + x) * c + ch] * (long)k[y][i];
                            o[(y * curW + x) * c + ch] = Clip8(ss);
                        }
                img = o;
            }
            Array.Copy(img, 0, result, (long)b * outHeight * outWidth * c, img.Length);
        }
        return torch.tensor(result, new long[] { n, outHeight, outWidth, c }, ScalarType.Byte);
    }

    /// <summary>The loops' pre-upscale: each side becomes int(side · <paramref name="scale"/>).</summary>
    public static Tensor Upscale(Tensor imagesNhwc, double scale) =>
        Resize(imagesNhwc, (int)(imagesNhwc.shape[1] * scale), (int)(imagesNhwc.shape[2] * scale));
}
