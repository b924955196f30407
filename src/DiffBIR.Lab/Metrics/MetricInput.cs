using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics;

/// <summary>
/// The two image layouts every <see cref="Metric"/> accepts, and the refusal of anything else with a message that says
/// what was seen and what to do: a metric computed on the wrong layout or range gives a plausible-looking wrong number
/// (PSNR of uint8 levels read as [0, 1] is ≈ −48 dB, of uint8 NHWC read as NCHW is nonsense), never an error.
/// </summary>
public static class MetricInput
{
    /// <summary>Slack of the [0, 1] range check (pyiqa's <c>InferenceModel</c> uses the same 1e-6).</summary>
    public const double RangeEps = 1e-6;

    /// <summary>
    /// Converts an image batch to float NCHW RGB (or grey) in [0, 1].
    /// <list type="bullet">
    /// <item>uint8 <c>[N, H, W, C]</c> or <c>[H, W, C]</c>, C = 1 or 3 — what <c>RestorationResult.Image</c> and
    /// <c>ImageIO.ToUInt8</c> give — becomes float32 x / 255, NCHW.</item>
    /// <item>float (16/32/64-bit) <c>[N, C, H, W]</c> or <c>[C, H, W]</c>, C = 1 or 3, values in [0, 1] (± 1e-6), is
    /// returned as is (an alias; its dtype is kept).</item>
    /// </list>
    /// Refused with an <see cref="ArgumentException"/> naming <paramref name="name"/>: other dtypes, other ranks, a float
    /// tensor that looks NHWC, a uint8 tensor that looks NCHW, float values outside [0, 1] (the message says whether they
    /// look like 0..255 levels or [−1, 1]).
    /// </summary>
    public static Tensor ToFloatNchw(Tensor image, string name = "image")
    {
        var shape = "[" + string.Join(", ", image.shape) + "]";
        if (image.dtype == ScalarType.Byte)
        {
            if (image.dim() is not (3 or 4))
                throw new ArgumentException($"{name}: a uint8 image must be NHWC [N, H, W, C] or [H, W, C], got {shape}");
            using var t = image.dim() == 3 ? image.unsqueeze(0) : image.alias();
            if (t.shape[3] is not (1 or 3))
            {
                var hint = t.shape[1] is 1 or 3 ? " — it looks NCHW; uint8 images are taken as NHWC (permute(0, 2, 3, 1))" : "";
                throw new ArgumentException($"{name}: a uint8 image must be NHWC with 1 or 3 channels last, got {shape}{hint}");
            }
            return IO.ImageIO.FromUInt8(t);
        }
        if (!image.is_floating_point())
            throw new ArgumentException($"{name}: expected a uint8 NHWC image or a float NCHW tensor in [0, 1], got dtype {image.dtype} {shape}");
        if (image.dim() is not (3 or 4))
            throw new ArgumentException($"{name}: a float image must be NCHW [N, C, H, W] or [C, H, W], got {shape}");
        var x = image.dim() == 3 ? image.unsqueeze(0) : image.alias();
        if (x.shape[1] is not (1 or 3))
        {
            x.Dispose();
            var hint = image.shape[^1] is 1 or 3 ? " — it looks NHWC; permute(0, 3, 1, 2) first" : "";
            throw new ArgumentException($"{name}: a float image must be NCHW with 1 or 3 channels, got {shape}{hint}");
        }
        if (x.numel() == 0) { x.Dispose(); throw new ArgumentException($"{name}: the image is empty {shape}"); }
        if (x.device.type != DeviceType.META)
        {
            double lo, hi;
            using (var mn = x.min()) using (var mn64 = mn.to_type(ScalarType.Float64)) lo = mn64.item<double>();
            using (var mx = x.max()) using (var mx64 = mx.to_type(ScalarType.Float64)) hi = mx64.item<double>();
            if (double.IsNaN(lo) || double.IsNaN(hi) || !(lo > -RangeEps && hi < 1 + RangeEps))
            {
                x.Dispose();
                string why = double.IsNaN(lo) || double.IsNaN(hi) ? "it holds NaN"
                    : hi > 1 + RangeEps && lo > -RangeEps && hi <= 255 + RangeEps ? "it looks like 0..255 levels: divide by 255, or pass the uint8 NHWC image"
                    : lo < -RangeEps && lo >= -1 - RangeEps && hi <= 1 + RangeEps ? "it looks like [−1, 1]: map it with (x + 1) / 2"
                    : "clamp or rescale it to [0, 1]";
                throw new ArgumentException($"{name}: a float image must hold values in [0, 1], got min={lo:G6}, max={hi:G6} — {why}");
            }
        }
        return x;
    }
}
