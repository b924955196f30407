namespace DiffBIR.Lab.Checkpoints;

/// <summary>A checkpoint could not be read or applied. The message always names the file and the cause.</summary>
public class CheckpointException : Exception
{
    public string FilePath { get; }
    public CheckpointException(string path, string cause, Exception? inner = null)
        : base($"{path}: {cause}", inner) => FilePath = path;
}

/// <summary>
/// A pickle asked for a Python global that a state dict never needs. Loading stops before anything is called,
/// so nothing from the file runs.
/// </summary>
public sealed class PickleSecurityException : CheckpointException
{
    public string Global { get; }
    public PickleSecurityException(string path, string global)
        : base(path, $"refused to load: the pickle references the global '{global}', which is not allowed in a checkpoint " +
                     "(only tensors, storages, OrderedDict and plain values are). Nothing from the file was executed. " +
                     "If you trust this file, re-save it as .safetensors with PyTorch.") => Global = global;
}
