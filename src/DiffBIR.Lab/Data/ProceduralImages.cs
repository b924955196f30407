using DiffBIR.Lab.Degradation;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Data;

/// <summary>
/// A seeded family of procedural "HQ" images, made by the project itself so that the tiny DiffBIR can be trained and
/// tested on any machine without a download. Each image is a background (linear or radial gradient, stripes,
/// checkerboard or a multi-octave value-noise texture) with 3–7 layers on top (anti-aliased discs, ellipses, rotated
/// rectangles and triangles filled with a flat colour, a gradient, stripes or a checker; strokes: thick lines and
/// quadratic curves; clusters of dots), and mild film grain. Feature sizes are in pixels of a nominal 128-px canvas
/// scaled by size/128, so a 64-px crop of a 128-px image and the full image share one scale.
/// Deterministic from (seed, index) on every platform: pure C# arithmetic with the project's xoshiro generator
/// (<see cref="SeededDegradationRandom"/>), no torch RNG, no threads. See docs/tiny-preset.md.
/// </summary>
public static class ProceduralImages
{
    /// <summary>The image of <paramref name="index"/> in the family of <paramref name="seed"/> as float [3, H, W] in [0, 1].</summary>
    public static Tensor Generate(long seed, long index, int size = 128) => Generate(seed, index, size, size);

    /// <summary>Float32 [3, <paramref name="height"/>, <paramref name="width"/>] in [0, 1] (sizes 16…1024).</summary>
    public static Tensor Generate(long seed, long index, int height, int width)
    {
        var rgb = Render(seed, index, height, width);
        return torch.tensor(rgb, new long[] { 3, height, width }, ScalarType.Float32);
    }

    /// <summary>The same image as uint8 [H, W, 3] (rounded).</summary>
    public static Tensor GenerateUInt8(long seed, long index, int size = 128)
    {
        var rgb = Render(seed, index, size, size);
        var hwc = new byte[rgb.Length];
        int n = size * size;
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < n; i++)
                hwc[i * 3 + c] = (byte)Math.Clamp(Math.Round(rgb[c * n + i] * 255.0), 0, 255);
        return torch.tensor(hwc, new long[] { size, size, 3 }, ScalarType.Byte);
    }

    /// <summary>A batch [N, 3, H, W] of images <paramref name="first"/> … first + N − 1.</summary>
    public static Tensor Batch(long seed, long first, int count, int size = 128)
    {
        var parts = new Tensor[count];
        for (int i = 0; i < count; i++) parts[i] = Generate(seed, first + i, size);
        var b = torch.stack(parts);
        foreach (var p in parts) p.Dispose();
        return b;
    }

    /// <summary>Channel-planar RGB floats (3·H·W) in [0, 1].</summary>
    public static float[] Render(long seed, long index, int height, int width)
    {
        if (height < 16 || width < 16 || height > 1024 || width > 1024)
            throw new ArgumentOutOfRangeException(nameof(height), $"procedural images are 16…1024 px per side, got {height}×{width}");
        if (index < 0) throw new ArgumentOutOfRangeException(nameof(index), index, "image index must be ≥ 0");
        var rng = new SeededDegradationRandom(Mix((ulong)seed, (ulong)index));
        var canvas = new Canvas(height, width, Math.Min(height, width) / 128.0);
        canvas.Background(rng);
        int layers = 3 + (int)(rng.NextDouble() * 5);
        for (int k = 0; k < layers; k++)
        {
            double u = rng.NextDouble();
            if (u < 0.55) canvas.Shape(rng);
            else if (u < 0.85) canvas.Stroke(rng);
            else canvas.Dots(rng);
        }
        canvas.Grain(rng);
        return canvas.Pixels;
    }

    static ulong Mix(ulong seed, ulong index)
    {
        ulong z = seed * 0x9E3779B97F4A7C15UL ^ (index + 0x632BE59BD9B4E019UL) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 31)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 29);
    }

    /// <summary>The painter: planar RGB, alpha compositing of anti-aliased coverage (signed distance, 1-px ramp).</summary>
    sealed class Canvas
    {
        readonly int _h, _w;
        readonly double _s;   // pixels per nominal pixel (size / 128)
        public readonly float[] Pixels;

        public Canvas(int h, int w, double scale) { _h = h; _w = w; _s = scale; Pixels = new float[3 * h * w]; }

        static double[] Colour(SeededDegradationRandom r)
        {
            // Saturated or muted colours, some dark or light: a wide gamut so that colour is worth modelling.
            double hue = r.NextDouble() * 6, sat = 0.2 + 0.8 * r.NextDouble(), val = 0.15 + 0.85 * r.NextDouble();
            int i = (int)hue % 6; double f = hue - Math.Floor(hue);
            double p = val * (1 - sat), q = val * (1 - sat * f), t = val * (1 - sat * (1 - f));
            return i switch
            {
                0 => new[] { val, t, p }, 1 => new[] { q, val, p }, 2 => new[] { p, val, t },
                3 => new[] { p, q, val }, 4 => new[] { t, p, val }, _ => new[] { val, p, q },
            };
        }

        void Blend(int y, int x, double[] c, double a)
        {
            if (a <= 0) return;
            if (a > 1) a = 1;
            int n = _h * _w, i = y * _w + x;
            for (int ch = 0; ch < 3; ch++) Pixels[ch * n + i] = (float)(Pixels[ch * n + i] * (1 - a) + c[ch] * a);
        }

        /// <summary>A fill: the colour of the pattern at (y, x) (flat, gradient, stripes, checker).</summary>
        Func<double, double, double[]> Fill(SeededDegradationRandom r, bool allowFlat)
        {
            var a = Colour(r); var b = Colour(r);
            double kind = r.NextDouble(), ang = r.NextDouble() * Math.PI, ca = Math.Cos(ang), sa = Math.Sin(ang);
            double period = (3 + 13 * r.NextDouble()) * _s, duty = 0.3 + 0.4 * r.NextDouble();
            double ox = r.NextDouble() * _w, oy = r.NextDouble() * _h, len = (20 + 100 * r.NextDouble()) * _s;
            double[] Mix(double t) => new[] { a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t };
            if (allowFlat && kind < 0.35) return (_, _) => a;
            if (kind < 0.6) return (y, x) => Mix(Math.Clamp(((x - ox) * ca + (y - oy) * sa) / len + 0.5, 0, 1));
            if (kind < 0.85)
                return (y, x) =>
                {
                    // Anti-aliased stripes: the distance to the stripe edge in pixels, ramped over one pixel.
                    double u = ((x - ox) * ca + (y - oy) * sa) / period, f = u - Math.Floor(u);
                    double d = Math.Min(Math.Abs(f - duty), Math.Min(f, 1 - f)) * period;
                    double inside = f < duty ? 1 : 0, cov = Math.Clamp(0.5 + (inside > 0 ? d : -d), 0, 1);
                    return Mix(cov);
                };
            double cell = (4 + 14 * r.NextDouble()) * _s;
            return (y, x) =>
            {
                double u = ((x - ox) * ca + (y - oy) * sa) / cell, v = (-(x - ox) * sa + (y - oy) * ca) / cell;
                double fu = u - Math.Floor(u), fv = v - Math.Floor(v);
                bool odd = (((long)Math.Floor(u) + (long)Math.Floor(v)) & 1) == 1;
                double du = Math.Min(fu, 1 - fu) * cell, dv = Math.Min(fv, 1 - fv) * cell, d = Math.Min(du, dv);
                double cov = Math.Clamp(0.5 + d, 0, 1);   // soft edges within half a pixel of a cell border
                double t = odd ? cov : 1 - cov;
                return Mix(t);
            };
        }

        public void Background(SeededDegradationRandom r)
        {
            double kind = r.NextDouble();
            if (kind < 0.7)
            {
                var fill = Fill(r, allowFlat: false);
                if (kind < 0.15)
                {
                    // Radial gradient instead of the fill's own pattern.
                    var a = Colour(r); var b = Colour(r);
                    double cx = r.NextDouble() * _w, cy = r.NextDouble() * _h, rad = (40 + 100 * r.NextDouble()) * _s;
                    fill = (y, x) =>
                    {
                        double t = Math.Clamp(Math.Sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy)) / rad, 0, 1);
                        return new[] { a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t };
                    };
                }
                for (int y = 0; y < _h; y++) for (int x = 0; x < _w; x++) Blend(y, x, fill(y + 0.5, x + 0.5), 1);
                return;
            }
            // Value noise: 3 octaves of bilinearly interpolated random lattices, mapped between two colours.
            var c0 = Colour(r); var c1 = Colour(r);
            var field = new double[_h * _w];
            double amp = 1, total = 0;
            for (int oct = 0; oct < 3; oct++)
            {
                double cell = (24.0 / (1 << oct)) * _s * (0.7 + 0.6 * r.NextDouble());
                int gh = (int)(_h / cell) + 2, gw = (int)(_w / cell) + 2;
                var g = new double[gh * gw];
                for (int i = 0; i < g.Length; i++) g[i] = r.NextDouble();
                for (int y = 0; y < _h; y++)
                    for (int x = 0; x < _w; x++)
                    {
                        double gy = y / cell, gx = x / cell; int iy = (int)gy, ix = (int)gx;
                        double fy = gy - iy, fx = gx - ix;
                        fy = fy * fy * (3 - 2 * fy); fx = fx * fx * (3 - 2 * fx);
                        double v = g[iy * gw + ix] * (1 - fx) * (1 - fy) + g[iy * gw + ix + 1] * fx * (1 - fy)
                                 + g[(iy + 1) * gw + ix] * (1 - fx) * fy + g[(iy + 1) * gw + ix + 1] * fx * fy;
                        field[y * _w + x] += amp * v;
                    }
                total += amp; amp *= 0.5;
            }
            for (int y = 0; y < _h; y++)
                for (int x = 0; x < _w; x++)
                {
                    double t = Math.Clamp((field[y * _w + x] / total - 0.5) * 1.8 + 0.5, 0, 1);
                    Blend(y, x, new[] { c0[0] + (c1[0] - c0[0]) * t, c0[1] + (c1[1] - c0[1]) * t, c0[2] + (c1[2] - c0[2]) * t }, 1);
                }
        }

        /// <summary>Paints where the signed distance <paramref name="sd"/> (negative inside, pixels) is below 0.5.</summary>
        void PaintSdf(Func<double, double, double> sd, Func<double, double, double[]> fill, double alpha, double y0, double y1, double x0, double x1)
        {
            int ya = Math.Max(0, (int)Math.Floor(y0) - 1), yb = Math.Min(_h - 1, (int)Math.Ceiling(y1) + 1);
            int xa = Math.Max(0, (int)Math.Floor(x0) - 1), xb = Math.Min(_w - 1, (int)Math.Ceiling(x1) + 1);
            for (int y = ya; y <= yb; y++)
                for (int x = xa; x <= xb; x++)
                {
                    double py = y + 0.5, px = x + 0.5, d = sd(py, px);
                    if (d >= 0.5) continue;
                    Blend(y, x, fill(py, px), alpha * Math.Clamp(0.5 - d, 0, 1));
                }
        }

        public void Shape(SeededDegradationRandom r)
        {
            var fill = Fill(r, allowFlat: true);
            double alpha = r.NextDouble() < 0.8 ? 1 : 0.5 + 0.4 * r.NextDouble();
            double cx = r.NextDouble() * _w, cy = r.NextDouble() * _h, size = (6 + 34 * r.NextDouble()) * _s;
            double ang = r.NextDouble() * Math.PI, ca = Math.Cos(ang), sa = Math.Sin(ang);
            double kind = r.NextDouble(), ar = 0.4 + 0.6 * r.NextDouble();
            double ext = size * 1.5;
            Func<double, double, double> sd;
            if (kind < 0.3) sd = (y, x) => Math.Sqrt((x - cx) * (x - cx) + (y - cy) * (y - cy)) - size;
            else if (kind < 0.5)
                sd = (y, x) =>
                {
                    // Ellipse: scaled distance (exact enough for a one-pixel ramp at these aspect ratios).
                    double u = (x - cx) * ca + (y - cy) * sa, v = -(x - cx) * sa + (y - cy) * ca;
                    double k = Math.Sqrt(u * u / (size * size) + v * v / (size * ar * size * ar));
                    return (k - 1) * size * ar;
                };
            else if (kind < 0.8)
                sd = (y, x) =>
                {
                    double u = Math.Abs((x - cx) * ca + (y - cy) * sa) - size, v = Math.Abs(-(x - cx) * sa + (y - cy) * ca) - size * ar;
                    double ou = Math.Max(u, 0), ov = Math.Max(v, 0);
                    return Math.Sqrt(ou * ou + ov * ov) + Math.Min(Math.Max(u, v), 0);
                };
            else
            {
                var px = new double[3]; var py = new double[3];
                for (int i = 0; i < 3; i++)
                {
                    double a = ang + i * 2 * Math.PI / 3 + (r.NextDouble() - 0.5) * 0.8, rr = size * (0.7 + 0.5 * r.NextDouble());
                    px[i] = cx + rr * Math.Cos(a); py[i] = cy + rr * Math.Sin(a);
                }
                sd = (y, x) => TriangleSd(y, x, py, px);
            }
            PaintSdf(sd, fill, alpha, cy - ext, cy + ext, cx - ext, cx + ext);
        }

        static double TriangleSd(double y, double x, double[] py, double[] px)
        {
            double best = double.MaxValue; int sign = 0;
            for (int i = 0; i < 3; i++)
            {
                int j = (i + 1) % 3;
                double ex = px[j] - px[i], ey = py[j] - py[i], wx = x - px[i], wy = y - py[i];
                double t = Math.Clamp((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1);
                double dx = wx - ex * t, dy = wy - ey * t;
                best = Math.Min(best, dx * dx + dy * dy);
                sign += ex * wy - ey * wx > 0 ? 1 : -1;
            }
            bool inside = sign == 3 || sign == -3;
            return inside ? -Math.Sqrt(best) : Math.Sqrt(best);
        }

        public void Stroke(SeededDegradationRandom r)
        {
            var colour = Colour(r);
            double width = (0.6 + 3 * r.NextDouble()) * _s;
            double x0 = r.NextDouble() * _w, y0 = r.NextDouble() * _h, x2 = r.NextDouble() * _w, y2 = r.NextDouble() * _h;
            bool curve = r.NextDouble() < 0.6;
            double x1 = curve ? r.NextDouble() * _w : (x0 + x2) / 2, y1 = curve ? r.NextDouble() * _h : (y0 + y2) / 2;
            // A quadratic Bézier as 24 segments; the distance is the minimum over segments.
            const int n = 24;
            var sx = new double[n + 1]; var sy = new double[n + 1];
            for (int i = 0; i <= n; i++)
            {
                double t = i / (double)n, a = (1 - t) * (1 - t), b = 2 * (1 - t) * t, c = t * t;
                sx[i] = a * x0 + b * x1 + c * x2; sy[i] = a * y0 + b * y1 + c * y2;
            }
            double sd(double y, double x)
            {
                double best = double.MaxValue;
                for (int i = 0; i < n; i++)
                {
                    double ex = sx[i + 1] - sx[i], ey = sy[i + 1] - sy[i], wx = x - sx[i], wy = y - sy[i];
                    double l2 = ex * ex + ey * ey, t = l2 > 0 ? Math.Clamp((wx * ex + wy * ey) / l2, 0, 1) : 0;
                    double dx = wx - ex * t, dy = wy - ey * t;
                    best = Math.Min(best, dx * dx + dy * dy);
                }
                return Math.Sqrt(best) - width / 2;
            }
            double minX = Math.Min(x0, Math.Min(x1, x2)), maxX = Math.Max(x0, Math.Max(x1, x2));
            double minY = Math.Min(y0, Math.Min(y1, y2)), maxY = Math.Max(y0, Math.Max(y1, y2));
            PaintSdf(sd, (_, _) => colour, 1, minY - width, maxY + width, minX - width, maxX + width);
        }

        public void Dots(SeededDegradationRandom r)
        {
            var colour = Colour(r);
            int count = 4 + (int)(r.NextDouble() * 12);
            double cx = r.NextDouble() * _w, cy = r.NextDouble() * _h, spread = (8 + 30 * r.NextDouble()) * _s;
            for (int i = 0; i < count; i++)
            {
                double x = cx + (r.NextDouble() - 0.5) * 2 * spread, y = cy + (r.NextDouble() - 0.5) * 2 * spread;
                double rad = (0.8 + 2.5 * r.NextDouble()) * _s;
                PaintSdf((py, px) => Math.Sqrt((px - x) * (px - x) + (py - y) * (py - y)) - rad, (_, _) => colour, 1, y - rad, y + rad, x - rad, x + rad);
            }
        }

        /// <summary>Mild per-pixel grain (σ ≤ 2 levels) so that flat regions carry a little texture.</summary>
        public void Grain(SeededDegradationRandom r)
        {
            double sigma = r.NextDouble() * 2.0 / 255;
            var noise = r.StandardNormal(_h * _w);
            int n = _h * _w;
            for (int i = 0; i < n; i++)
                for (int ch = 0; ch < 3; ch++)
                    Pixels[ch * n + i] = (float)Math.Clamp(Pixels[ch * n + i] + sigma * noise[i], 0, 1);
        }
    }
}
