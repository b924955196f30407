using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.IO;

/// <summary>Deterministic synthetic images for demos, notebooks and tests (no files needed).</summary>
public static class TestImages
{
    /// <summary>
    /// A colour test card [1,3,H,W] in [0,1]: a horizontal ramp (red), concentric rings of rising frequency (green) and
    /// a vertical ramp over a checkerboard (blue) — flat regions, smooth gradients and sharp edges side by side, which
    /// is what the gradient map W = 1 − G of restoration guidance tells apart.
    /// </summary>
    /// <remarks>Computed in .NET doubles and rounded to float32 once, so the card is bit-identical on every machine,
    /// thread count and load (libtorch's vectorised sin picks a SIMD or scalar path per element by how the work is
    /// split, which changed pixels between runs).</remarks>
    public static Tensor Card(int height, int width)
    {
        if (height < 1 || width < 1) throw new ArgumentOutOfRangeException(nameof(height), $"a card needs at least 1×1 pixels (got {width}×{height})");
        var v = new float[3 * height * width];
        int plane = height * width;
        for (int i = 0; i < height; i++)
        {
            double y = height == 1 ? 0 : (double)i / (height - 1);          // torch.linspace(0, 1, n)
            for (int j = 0; j < width; j++)
            {
                double x = width == 1 ? 0 : (double)j / (width - 1);
                double r = Math.Sqrt((x - 0.5) * (x - 0.5) + (y - 0.5) * (y - 0.5));
                double checker = (Math.Floor(x * 8) + Math.Floor(y * 6)) % 2;
                int k = i * width + j;
                v[k] = (float)x;
                v[plane + k] = (float)(Math.Sin(r * 40) * 0.5 + 0.5);
                v[2 * plane + k] = (float)(0.7 * y + 0.3 * checker);
            }
        }
        return torch.tensor(v, new long[] { 1, 3, height, width });
    }
}
