namespace DiffBIR.Lab.Degradation;

/// <summary>
/// Replays recorded draws, e.g. the <c>scripted_draws</c> of the degradation fixture. Uniforms and choices come from
/// separate queues because the official code takes them from separate generators (numpy and Python's <c>random</c>).
/// Every uniform must lie in the [low, high] the code asks for; running out of draws is an error.
/// </summary>
public sealed class ScriptedDegradationRandom : IDegradationRandom
{
    readonly Queue<double> _uniforms;
    readonly Queue<int> _choices;
    readonly Func<int, double[]>? _normals;

    /// <param name="uniforms">values returned by successive <see cref="Uniform"/> calls</param>
    /// <param name="choices">indices returned by successive <see cref="Choose"/> calls</param>
    /// <param name="normals">supplies <see cref="StandardNormal"/> draws (null: asking for normals is an error)</param>
    public ScriptedDegradationRandom(IEnumerable<double> uniforms, IEnumerable<int>? choices = null, Func<int, double[]>? normals = null)
    {
        _uniforms = new Queue<double>(uniforms);
        _choices = new Queue<int>(choices ?? Array.Empty<int>());
        _normals = normals;
    }

    public int RemainingUniforms => _uniforms.Count;
    public int RemainingChoices => _choices.Count;

    public double Uniform(double low, double high)
    {
        if (!_uniforms.TryDequeue(out var u))
            throw new InvalidOperationException($"scripted random source: no uniform draw left for uniform({low}, {high})");
        if (u < low || u > high)
            throw new InvalidOperationException($"scripted random source: draw {u} is outside uniform({low}, {high})");
        return u;
    }

    public int Choose(IReadOnlyList<double> weights)
    {
        if (!_choices.TryDequeue(out var i))
            throw new InvalidOperationException($"scripted random source: no choice left among {weights.Count} options");
        if (i < 0 || i >= weights.Count || weights[i] <= 0)
            throw new InvalidOperationException($"scripted random source: choice {i} is impossible with weights [{string.Join(", ", weights)}]");
        return i;
    }

    public double[] StandardNormal(int count) =>
        _normals?.Invoke(count) ?? throw new InvalidOperationException("scripted random source: no normal draws were scripted");
}
