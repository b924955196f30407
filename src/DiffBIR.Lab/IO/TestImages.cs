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
    public static Tensor Card(int height, int width)
    {
        using var scope = torch.NewDisposeScope();
        var y = torch.linspace(0, 1, height).view(height, 1).expand(height, width);
        var x = torch.linspace(0, 1, width).view(1, width).expand(height, width);
        var r = ((x - 0.5).pow(2) + (y - 0.5).pow(2)).sqrt();
        var rings = (r * 40).sin() * 0.5 + 0.5;
        var checker = ((x * 8).floor() + (y * 6).floor()).remainder(2);
        return torch.stack(new[] { x, rings, 0.7 * y + 0.3 * checker }).unsqueeze(0).contiguous().MoveToOuterDisposeScope();
    }
}
