using DiffBIR.Lab.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>
/// Linear multistep (k-diffusion <c>sample_lms</c>): x ← x + Σ_j c_j d_{i−j} over the last min(i+1, order) slopes,
/// c_j = ∫_{σ_i}^{σ_{i+1}} Π_{k≠j} (τ − σ_{i−k})/(σ_{i−j} − σ_{i−k}) dτ (Lagrange basis). The official code integrates
/// with scipy quad (exact for these polynomials); here Gauss–Legendre with 5 nodes (exact to degree 9) in float64, with
/// the denominators rounded to float32 as numpy does with the float32 σ array.
/// </summary>
public sealed class EdmLms : EdmSampler
{
    public EdmLms(NoiseSchedule schedule, SamplerOptions? options = null) : base(schedule, options) { }
    public override string Solver => "lms";

    static readonly double[] GlX = { -0.9061798459386640, -0.5384693101056831, 0.0, 0.5384693101056831, 0.9061798459386640 };
    static readonly double[] GlW = { 0.2369268850561891, 0.4786286704993665, 0.5688888888888889, 0.4786286704993665, 0.2369268850561891 };

    public static double Coefficient(int order, float[] t, int i, int j)
    {
        if (order - 1 > i) throw new ArgumentException($"Order {order} too high for step {i}");
        double F(double tau)
        {
            double prod = 1.0;
            for (int k = 0; k < order; k++)
            {
                if (j == k) continue;
                float den = t[i - j] - t[i - k];
                prod *= (tau - t[i - k]) / den;
            }
            return prod;
        }
        double a = t[i], b = t[i + 1], half = (b - a) / 2, mid = (a + b) / 2, sum = 0;
        for (int q = 0; q < GlX.Length; q++) sum += GlW[q] * F(mid + half * GlX[q]);
        return sum * half;
    }

    protected override IEnumerable<ModelRequest> Solve(Edm e, Tensor x)
    {
        int order = Options.Order;
        var sig = e.Sigmas.cpu().data<float>().ToArray();
        var ds = new List<Tensor>();
        for (int i = 0; i < e.N; i++)
        {
            yield return Denoise(e, x, e.S(i), e.S(i + 1), i, true, ds.ToArray());
            var denoised = e.Ctx.PredictedX0;
            var d = ToD(x, e.S(i), denoised);
            ds.Add(d);
            if (ds.Count > order) ds.RemoveAt(0);
            Callback(e, x, denoised);
            int cur = Math.Min(i + 1, order);
            var coeffs = Enumerable.Range(0, cur).Select(j => Coefficient(cur, sig, i, j)).ToArray();
            Tensor? acc = null;
            for (int j = 0; j < cur; j++)
            {
                var term = coeffs[j] * ds[ds.Count - 1 - j];
                acc = acc is null ? term : acc + term;
            }
            x = x + acc!;
        }
        e.Ctx.Result = x;
    }
}
