namespace DiffBIR.Lab.Degradation;

/// <summary>
/// Where the degradation pipeline draws its random numbers. The official code draws from two generators — Python's
/// <c>random</c> for the kernel type (<c>random.choices</c>) and numpy's legacy <c>np.random</c> for everything else
/// (<c>uniform</c>, <c>randn</c>) — in a fixed order; a source that replays recorded draws reproduces an official
/// sample exactly (DiffBIR.Lab.Parity's <c>ScriptedDegradationRandom</c>).
/// </summary>
public interface IDegradationRandom
{
    /// <summary>One draw of <c>np.random.uniform(low, high)</c>: a value in [low, high).</summary>
    double Uniform(double low, double high);

    /// <summary><c>random.choices(range(len(weights)), weights)[0]</c>: an index drawn with probability ∝ weight.</summary>
    int Choose(IReadOnlyList<double> weights);

    /// <summary><c>np.random.randn(count)</c>: standard normal values, in the order numpy fills a C-ordered array.</summary>
    double[] StandardNormal(int count);
}

/// <summary>
/// A seeded, platform-independent generator (xoshiro256** seeded by SplitMix64; normals by the Marsaglia polar
/// method), so a training set drawn with the same seed is the same on every machine and .NET version. It does not
/// reproduce numpy's Mersenne-Twister streams: the statistics match the official code, the individual draws do not.
/// </summary>
public sealed class SeededDegradationRandom : IDegradationRandom
{
    ulong _s0, _s1, _s2, _s3;
    double? _spareNormal;

    public SeededDegradationRandom(ulong seed)
    {
        ulong sm = seed;
        _s0 = SplitMix64(ref sm); _s1 = SplitMix64(ref sm); _s2 = SplitMix64(ref sm); _s3 = SplitMix64(ref sm);
    }

    static ulong SplitMix64(ref ulong x)
    {
        ulong z = x += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    ulong NextUInt64()
    {
        ulong result = ulong.RotateLeft(_s1 * 5, 7) * 9;
        ulong t = _s1 << 17;
        _s2 ^= _s0; _s3 ^= _s1; _s1 ^= _s2; _s0 ^= _s3;
        _s2 ^= t;
        _s3 = ulong.RotateLeft(_s3, 45);
        return result;
    }

    /// <summary>A double in [0, 1) with 53 random bits (numpy's <c>random_sample</c> construction).</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / 9007199254740992.0);

    public double Uniform(double low, double high) => low + (high - low) * NextDouble();

    public int Choose(IReadOnlyList<double> weights) => DegradationRandomExtensions.ChooseWith(weights, NextDouble());

    public double[] StandardNormal(int count)
    {
        var r = new double[count];
        for (int i = 0; i < count; i++) r[i] = NextNormal();
        return r;
    }

    double NextNormal()
    {
        if (_spareNormal is double spare) { _spareNormal = null; return spare; }
        double u, v, s;
        do
        {
            u = 2 * NextDouble() - 1;
            v = 2 * NextDouble() - 1;
            s = u * u + v * v;
        } while (s >= 1 || s == 0);
        double f = Math.Sqrt(-2 * Math.Log(s) / s);
        _spareNormal = v * f;
        return u * f;
    }
}

static class DegradationRandomExtensions
{
    /// <summary>Python's <c>random.choices</c>: bisect(cumulative weights, u · total).</summary>
    internal static int ChooseWith(IReadOnlyList<double> weights, double u)
    {
        double total = 0;
        foreach (var w in weights) total += w;
        double target = u * total, cum = 0;
        for (int i = 0; i < weights.Count; i++)
        {
            cum += weights[i];
            if (target < cum) return i;
        }
        return weights.Count - 1;
    }
}
