using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>
/// The counter-based generator the IQA fixtures use for tensors too large to store (fixtures/iqa/README.md, LPIPS-VGG
/// section): CLIP's <c>token_embedding.weight</c> here. Element i of key k is a pure function of (seed, k, i), so any
/// element can be produced without replaying a stream.
/// </summary>
/// <remarks>
/// base = FNV-1a-64 of the UTF-8 text "&lt;seed&gt;:&lt;key&gt;"; element i (row-major) takes SplitMix64 output i
/// (z = base + (i+1)·0x9E3779B97F4A7C15, then the three xor-shift-multiply rounds), keeps its top 24 bits k and maps
/// them to the centre of one of 2²⁴ equal cells of [−a, a): ((2k + 1) / 2²⁴ − 1) · a, computed in double and rounded
/// to float32 once.
/// </remarks>
public static class CounterInit
{
    /// <summary>FNV-1a-64 of the UTF-8 bytes of "seed:key".</summary>
    public static ulong Base(long seed, string key)
    {
        ulong h = 0xcbf29ce484222325UL;
        foreach (var b in Encoding.UTF8.GetBytes($"{seed}:{key}"))
        {
            h ^= b;
            h *= 0x100000001b3UL;
        }
        return h;
    }

    /// <summary>Element <paramref name="index"/> (row-major) of the tensor whose <see cref="Base"/> is <paramref name="base"/>.</summary>
    public static float Value(ulong @base, long index, double a)
    {
        ulong z = unchecked(@base + (ulong)(index + 1) * 0x9E3779B97F4A7C15UL);
        z = unchecked((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL);
        z = unchecked((z ^ (z >> 27)) * 0x94D049BB133111EBUL);
        z ^= z >> 31;
        ulong k = z >> 40;
        return (float)(((2.0 * k + 1.0) / 16777216.0 - 1.0) * a);
    }

    /// <summary>The whole float32 tensor of the given shape, uniform in [−a, a) with the generator above.</summary>
    public static Tensor Uniform(long seed, string key, long[] shape, double a)
    {
        long n = shape.Aggregate(1L, (x, y) => x * y);
        if (n > int.MaxValue) throw new ArgumentException($"{key}: {n} values do not fit one array");
        var values = new float[n];
        var b = Base(seed, key);
        Parallel.For(0, (int)((n + 65535) / 65536), chunk =>
        {
            long start = (long)chunk * 65536, end = Math.Min(n, start + 65536);
            for (long i = start; i < end; i++) values[i] = Value(b, i, a);
        });
        return torch.tensor(values, shape, ScalarType.Float32);
    }

    /// <summary>LPIPS-VGG trunk (README): a = sqrt(3 / fan_in) for conv weights (fan_in = in·kh·kw), 0.1·sqrt(3) for biases.</summary>
    public static double Amplitude(string key, long[] shape) =>
        key.EndsWith(".bias", StringComparison.Ordinal) ? 0.1 * Math.Sqrt(3.0) : Math.Sqrt(3.0 / shape.Skip(1).Aggregate(1L, (x, y) => x * y));

    /// <summary>
    /// CLIP's token embedding as the clipiqa fixture defines it: [vocab, width], uniform with the standard deviation
    /// of the N(0, 0.02) embedding rule, a = 0.02·√3.
    /// </summary>
    public static Tensor ClipTokenEmbedding(long seed, long vocab, long width) =>
        Uniform(seed, "token_embedding.weight", new[] { vocab, width }, 0.02 * Math.Sqrt(3.0));
}
