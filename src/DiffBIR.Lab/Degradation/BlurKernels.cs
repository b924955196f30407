using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Degradation;

/// <summary>A closed interval [Low, High] of a random parameter (the official <c>*_range</c> pairs).</summary>
public sealed record ValueRange(double Low, double High)
{
    public override string ToString() => $"[{Low}, {High}]";
}

/// <summary>The kernel families of <c>random_mixed_kernels</c>, by their official names.</summary>
public enum BlurKernelType
{
    /// <summary>'iso': isotropic Gaussian, Σ = σ²I.</summary>
    Iso,
    /// <summary>'aniso': anisotropic Gaussian, Σ = R(θ) diag(σx², σy²) R(θ)ᵀ.</summary>
    Aniso,
    /// <summary>'generalized_iso': exp(−½ qᵝ), isotropic.</summary>
    GeneralizedIso,
    /// <summary>'generalized_aniso': exp(−½ qᵝ), anisotropic.</summary>
    GeneralizedAniso,
    /// <summary>'plateau_iso': 1 / (qᵝ + 1), isotropic.</summary>
    PlateauIso,
    /// <summary>'plateau_aniso': 1 / (qᵝ + 1), anisotropic.</summary>
    PlateauAniso,
}

/// <summary>A kernel drawn by <see cref="BlurKernels.RandomMixed"/> and the parameters that produced it.</summary>
/// <param name="Type">the kernel family drawn from kernel_list</param>
/// <param name="SigmaX">σx (the σ of isotropic kernels)</param>
/// <param name="SigmaY">σy (= σx for isotropic kernels)</param>
/// <param name="Rotation">θ in radians (0 for isotropic kernels)</param>
/// <param name="Beta">the shape β of generalized / plateau kernels; null for Gaussians</param>
/// <param name="Kernel">float64 [K,K], sums to 1</param>
public sealed record BlurKernelDraw(BlurKernelType Type, double SigmaX, double SigmaY, double Rotation, double? Beta, Tensor Kernel)
{
    public override string ToString() =>
        $"{BlurKernels.OfficialName(Type)} σx={SigmaX:G6} σy={SigmaY:G6} θ={Rotation:G6}" + (Beta is double b ? $" β={b:G6}" : "") + $" K={Kernel.shape[0]}";
}

/// <summary>
/// The blur kernels of Real-ESRGAN / BasicSR as copied into <c>diffbir/dataset/degradation.py</c>, in float64 (numpy's
/// dtype there). On a K×K grid of offsets (x = column − c, y = row − c, c = (K−1)/2) with q = [x y] Σ⁻¹ [x y]ᵀ:
/// Gaussian exp(−q/2), generalized Gaussian exp(−½ qᵝ), plateau 1/(qᵝ + 1), each divided by its sum.
/// </summary>
public static class BlurKernels
{
    public static string OfficialName(BlurKernelType t) => t switch
    {
        BlurKernelType.Iso => "iso",
        BlurKernelType.Aniso => "aniso",
        BlurKernelType.GeneralizedIso => "generalized_iso",
        BlurKernelType.GeneralizedAniso => "generalized_aniso",
        BlurKernelType.PlateauIso => "plateau_iso",
        BlurKernelType.PlateauAniso => "plateau_aniso",
        _ => throw new ArgumentOutOfRangeException(nameof(t)),
    };

    /// <summary>The type named as in the official kernel_list ('iso', 'aniso', 'generalized_iso', …).</summary>
    public static BlurKernelType Parse(string officialName) => officialName switch
    {
        "iso" => BlurKernelType.Iso,
        "aniso" => BlurKernelType.Aniso,
        "generalized_iso" => BlurKernelType.GeneralizedIso,
        "generalized_aniso" => BlurKernelType.GeneralizedAniso,
        "plateau_iso" => BlurKernelType.PlateauIso,
        "plateau_aniso" => BlurKernelType.PlateauAniso,
        _ => throw new ArgumentException(
            $"unknown kernel type '{officialName}': expected iso, aniso, generalized_iso, generalized_aniso, plateau_iso or plateau_aniso " +
            "('skew' is listed in the official docstring but not implemented there either)", nameof(officialName)),
    };

    /// <summary>bivariate_Gaussian: exp(−q/2) / Σ. Isotropic: only σx is used.</summary>
    public static Tensor BivariateGaussian(int kernelSize, double sigmaX, double sigmaY, double theta, bool isotropic) =>
        ToTensor(Normalize(Quadratic(kernelSize, sigmaX, sigmaY, theta, isotropic, q => Math.Exp(-0.5 * q))), kernelSize);

    /// <summary>bivariate_generalized_Gaussian: exp(−½ qᵝ) / Σ (β = 1 is the Gaussian).</summary>
    public static Tensor BivariateGeneralizedGaussian(int kernelSize, double sigmaX, double sigmaY, double theta, double beta, bool isotropic) =>
        ToTensor(Normalize(Quadratic(kernelSize, sigmaX, sigmaY, theta, isotropic, q => Math.Exp(-0.5 * Math.Pow(q, beta)))), kernelSize);

    /// <summary>bivariate_plateau: 1/(qᵝ + 1) / Σ.</summary>
    public static Tensor BivariatePlateau(int kernelSize, double sigmaX, double sigmaY, double theta, double beta, bool isotropic) =>
        ToTensor(Normalize(Quadratic(kernelSize, sigmaX, sigmaY, theta, isotropic, q => 1.0 / (Math.Pow(q, beta) + 1))), kernelSize);

    /// <summary>
    /// circular_lowpass_kernel (the 2-D "sinc"): ω_c J₁(ω_c r) / (2π r) with r the distance to the centre and the centre
    /// set to its limit ω_c²/(4π), divided by its sum, then zero-padded symmetrically to <paramref name="padTo"/> when
    /// that is larger than <paramref name="kernelSize"/>.
    /// </summary>
    /// <param name="cutoff">ω_c in radians (π is the Nyquist frequency)</param>
    /// <param name="kernelSize">K, odd</param>
    /// <param name="padTo">final size (odd) when larger than K; 0 = no padding</param>
    public static Tensor CircularLowpass(double cutoff, int kernelSize, int padTo = 0)
    {
        RequireOdd(kernelSize);
        int k = kernelSize;
        double c = (k - 1) / 2.0;
        var kern = new double[k * k];
        for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++)
        {
            double r = Math.Sqrt((i - c) * (i - c) + (j - c) * (j - c));
            kern[i * k + j] = cutoff * Bessel.J1(cutoff * r) / (2 * Math.PI * r);   // NaN at the centre, replaced below
        }
        kern[(k - 1) / 2 * k + (k - 1) / 2] = cutoff * cutoff / (4 * Math.PI);
        Normalize(kern);
        if (padTo > k)
        {
            // As np.pad with (pad, pad): an even difference is assumed (both sizes odd).
            int pad = (padTo - k) / 2, n = k + 2 * pad;
            var padded = new double[n * n];
            for (int i = 0; i < k; i++)
                Array.Copy(kern, i * k, padded, (i + pad) * n + pad, k);
            return ToTensor(padded, n);
        }
        return ToTensor(kern, k);
    }

    /// <summary>
    /// random_mixed_kernels: picks a type by <paramref name="kernelProb"/>, then draws σx (and σy, θ for anisotropic
    /// types; β for generalized/plateau) uniformly from their ranges, in the official order. The Gaussian branches
    /// normalise a second time after the (optional) multiplicative noise, as random_bivariate_Gaussian does.
    /// </summary>
    /// <param name="kernelList">the candidate types (kernel_list)</param>
    /// <param name="kernelProb">their weights (kernel_prob)</param>
    /// <param name="rng">the random source (seeded, or scripted to replay official draws)</param>
    /// <param name="kernelSize">K, odd</param>
    /// <param name="sigmaXRange">σx range; official default [0.6, 5]</param>
    /// <param name="sigmaYRange">σy range; official default [0.6, 5]</param>
    /// <param name="rotationRange">θ range; official default [−π, π]</param>
    /// <param name="betaGRange">β range of generalized Gaussians; official default [0.5, 8]</param>
    /// <param name="betaPRange">β range of plateau kernels; official default [0.5, 8]</param>
    /// <param name="noiseRange">multiplicative kernel noise (not used by the plateau types, as officially); null = none</param>
    public static BlurKernelDraw RandomMixed(
        IReadOnlyList<BlurKernelType> kernelList, IReadOnlyList<double> kernelProb, IDegradationRandom rng,
        int kernelSize = 21, ValueRange? sigmaXRange = null, ValueRange? sigmaYRange = null, ValueRange? rotationRange = null,
        ValueRange? betaGRange = null, ValueRange? betaPRange = null, ValueRange? noiseRange = null)
    {
        if (kernelList.Count != kernelProb.Count)
            throw new ArgumentException($"kernel_list has {kernelList.Count} types but kernel_prob has {kernelProb.Count} weights");
        RequireOdd(kernelSize);
        var sx = sigmaXRange ?? new(0.6, 5);
        var sy = sigmaYRange ?? new(0.6, 5);
        var rot = rotationRange ?? new(-Math.PI, Math.PI);
        var type = kernelList[rng.Choose(kernelProb)];
        bool iso = type is BlurKernelType.Iso or BlurKernelType.GeneralizedIso or BlurKernelType.PlateauIso;

        // Draw order of random_bivariate_*: σx; then σy, θ if anisotropic; then β (a coin, then a uniform).
        double sigmaX = rng.Uniform(sx.Low, sx.High), sigmaY = sigmaX, theta = 0;
        if (!iso)
        {
            sigmaY = rng.Uniform(sy.Low, sy.High);
            theta = rng.Uniform(rot.Low, rot.High);
        }
        double? beta = null;
        if (type is not (BlurKernelType.Iso or BlurKernelType.Aniso))
        {
            var br = type is BlurKernelType.GeneralizedIso or BlurKernelType.GeneralizedAniso ? betaGRange ?? new(0.5, 8) : betaPRange ?? new(0.5, 8);
            // "assume beta_range[0] < 1 < beta_range[1]": half the time below 1, half above.
            beta = rng.Uniform(0, 1) < 0.5 ? rng.Uniform(br.Low, 1) : rng.Uniform(1, br.High);
        }
        Func<double, double> shape = type switch
        {
            BlurKernelType.Iso or BlurKernelType.Aniso => q => Math.Exp(-0.5 * q),
            BlurKernelType.GeneralizedIso or BlurKernelType.GeneralizedAniso => q => Math.Exp(-0.5 * Math.Pow(q, beta!.Value)),
            _ => q => 1.0 / (Math.Pow(q, beta!.Value) + 1),
        };
        var kern = Normalize(Quadratic(kernelSize, sigmaX, sigmaY, theta, iso, shape));
        var noise = type is BlurKernelType.PlateauIso or BlurKernelType.PlateauAniso ? null : noiseRange;
        if (noise != null)
            for (int i = 0; i < kern.Length; i++) kern[i] *= rng.Uniform(noise.Low, noise.High);
        Normalize(kern);
        return new BlurKernelDraw(type, sigmaX, sigmaY, theta, beta, ToTensor(kern, kernelSize));
    }

    /// <summary>f(q) on the K×K grid, q = [x y] Σ⁻¹ [x y]ᵀ, evaluated in numpy's order (grid · Σ⁻¹, then · grid, summed).</summary>
    static double[] Quadratic(int k, double sigmaX, double sigmaY, double theta, bool isotropic, Func<double, double> f)
    {
        double s00, s01, s10, s11;
        if (isotropic) { s00 = sigmaX * sigmaX; s01 = 0; s10 = 0; s11 = sigmaX * sigmaX; }
        else
        {
            // sigma_matrix2: U · (D · Uᵀ), U = [[cos, −sin], [sin, cos]].
            double c = Math.Cos(theta), s = Math.Sin(theta);
            double d0 = sigmaX * sigmaX, d1 = sigmaY * sigmaY;
            double u00 = c, u01 = -s, u10 = s, u11 = c;
            double m00 = d0 * u00, m01 = d0 * u10, m10 = d1 * u01, m11 = d1 * u11;   // D · Uᵀ
            s00 = u00 * m00 + u01 * m10; s01 = u00 * m01 + u01 * m11;
            s10 = u10 * m00 + u11 * m10; s11 = u10 * m01 + u11 * m11;
        }
        // 2×2 inverse in closed form (numpy uses LAPACK LU; they agree to a few ulps, ~1e-14 at condition 1e4).
        double det = s00 * s11 - s01 * s10;
        double i00 = s11 / det, i01 = -s01 / det, i10 = -s10 / det, i11 = s00 / det;
        var kern = new double[k * k];
        int half = k / 2;
        for (int r = 0; r < k; r++)
        for (int col = 0; col < k; col++)
        {
            double x = col - half, y = r - half;
            double t0 = x * i00 + y * i10, t1 = x * i01 + y * i11;
            kern[r * k + col] = f(t0 * x + t1 * y);
        }
        return kern;
    }

    static double[] Normalize(double[] kern)
    {
        double sum = 0;
        foreach (var v in kern) sum += v;
        for (int i = 0; i < kern.Length; i++) kern[i] /= sum;
        return kern;
    }

    static void RequireOdd(int kernelSize)
    {
        if (kernelSize <= 0 || kernelSize % 2 != 1) throw new ArgumentException($"kernel size must be a positive odd number, got {kernelSize}");
    }

    static Tensor ToTensor(double[] data, int k) => torch.tensor(data, new long[] { k, k }, ScalarType.Float64);
}
