//! Archives on local disk: the staged tar.zst of a repository, and uploaded ZIPs unpacked
//! safely. A ZIP is checked entry by entry before a single byte is written: no absolute
//! paths, no `..`, no symlinks, a bounded entry count and size. A common top-level folder
//! (as in GitHub's zipballs) is stripped. Blocking code: call it from `spawn_blocking`.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Writes `dir` as a tar.zst at `out`; returns the number of files. Symlinks are stored as
/// links, never followed.
pub fn pack_tar_zst(dir: &Path, out: &Path, level: i32) -> std::io::Result<u64> {
    let file = std::fs::File::create(out)?;
    let encoder = zstd::stream::write::Encoder::new(file, level)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut files = 0u64;
    for entry in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry
            .path()
            .strip_prefix(dir)
            .map_err(std::io::Error::other)?;
        builder.append_path_with_name(entry.path(), rel)?;
        if entry.file_type().is_file() {
            files += 1;
        }
    }
    builder.into_inner()?.finish()?;
    Ok(files)
}

/// Restores a tar.zst into `dest`. The tar crate refuses entries that would land outside
/// `dest`.
pub fn unpack_tar_zst(archive: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let file = std::fs::File::open(archive)?;
    let decoder = zstd::stream::read::Decoder::new(file)?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    tar.unpack(dest)
}

/// Unpacks `zip` into `dest` after checking every entry. Returns a message for the user on
/// refusal; nothing is written unless the whole archive passes the checks.
pub fn unzip_safely(
    zip: &Path,
    dest: &Path,
    max_entries: u64,
    max_bytes: u64,
) -> Result<u64, String> {
    let (mut archive, names) = open_checked(zip, max_entries, max_bytes)?;
    // GitHub-style archives wrap everything in one folder; strip it.
    let prefix = common_root(&names);
    // Pass 2: extract, counting real bytes (a header can lie about sizes).
    let mut written = 0u64;
    for (i, path, is_dir) in names {
        let rel = match &prefix {
            Some(p) => match path.strip_prefix(p) {
                Ok(r) if r.as_os_str().is_empty() => continue,
                Ok(r) => r.to_path_buf(),
                Err(_) => path.clone(),
            },
            None => path.clone(),
        };
        let out = dest.join(&rel);
        if is_dir {
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("cannot create {}: {e}", rel.display()))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut entry = archive
            .by_index(i)
            .map_err(|e| format!("corrupt ZIP entry {}: {e}", path.display()))?;
        let mut f = std::fs::File::create(&out)
            .map_err(|e| format!("cannot write {}: {e}", rel.display()))?;
        let budget = max_bytes - written;
        let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut f)
            .map_err(|e| format!("cannot unpack {}: {e}", path.display()))?;
        written += n;
        if written > max_bytes {
            return Err(format!(
                "the ZIP archive unpacks to more than {max_bytes} bytes"
            ));
        }
        #[cfg(unix)]
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode & 0o755));
        }
    }
    Ok(written)
}

/// Checks an uploaded ZIP without unpacking it (the gateway's early refusal); returns the
/// number of entries.
pub fn inspect_zip(zip: &Path, max_entries: u64, max_bytes: u64) -> Result<usize, String> {
    open_checked(zip, max_entries, max_bytes).map(|(_, names)| names.len())
}

type CheckedEntries = Vec<(usize, PathBuf, bool)>;

/// Opens a ZIP and validates every entry's name, kind and declared size.
fn open_checked(
    zip: &Path,
    max_entries: u64,
    max_bytes: u64,
) -> Result<(zip::ZipArchive<std::fs::File>, CheckedEntries), String> {
    let file =
        std::fs::File::open(zip).map_err(|e| format!("cannot open the uploaded archive: {e}"))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| format!("the upload is not a valid ZIP archive: {e}"))?;
    if archive.len() as u64 > max_entries {
        return Err(format!(
            "the ZIP archive has {} entries, more than the {max_entries} allowed",
            archive.len()
        ));
    }
    let mut names: CheckedEntries = Vec::with_capacity(archive.len());
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| format!("corrupt ZIP entry {i}: {e}"))?;
        let raw = entry
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| format!("#{i}"));
        let Some(path) = entry.enclosed_name() else {
            return Err(format!(
                "ZIP entry `{raw}` points outside the archive (absolute path or `..`)"
            ));
        };
        if entry.is_symlink() {
            return Err(format!(
                "ZIP entry `{raw}` is a symbolic link; links are not accepted"
            ));
        }
        declared = declared.saturating_add(entry.size());
        if declared > max_bytes {
            return Err(format!(
                "the ZIP archive unpacks to more than {max_bytes} bytes"
            ));
        }
        names.push((i, path, entry.is_dir()));
    }
    Ok((archive, names))
}

fn common_root(names: &[(usize, PathBuf, bool)]) -> Option<PathBuf> {
    let first = names.first()?.1.components().next()?.as_os_str().to_owned();
    let all_under = names.iter().all(|(_, p, is_dir)| {
        let mut c = p.components();
        c.next().map(|x| x.as_os_str() == first).unwrap_or(false) && (c.next().is_some() || *is_dir)
    });
    all_under.then(|| PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pack_and_unpack_round_trip() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), "deep").unwrap();
        std::fs::write(src.path().join("top.py"), "top").unwrap();
        std::os::unix::fs::symlink("top.py", src.path().join("link")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let arc = out.path().join("x.tar.zst");
        assert_eq!(pack_tar_zst(src.path(), &arc, 3).unwrap(), 2);
        let dest = out.path().join("restored");
        unpack_tar_zst(&arc, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("a/b/c.txt")).unwrap(),
            "deep"
        );
        assert_eq!(
            std::fs::read_link(dest.join("link")).unwrap(),
            Path::new("top.py")
        );
    }

    fn zip_with(entries: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(std::fs::File::create(f.path()).unwrap());
        for (name, body) in entries {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(body.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        f
    }

    #[test]
    fn refuses_escaping_entries_before_writing_anything() {
        let outside = tempfile::tempdir().unwrap();
        let dest = outside.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let z = zip_with(&[("ok.txt", "fine"), ("../escape.txt", "gotcha")]);
        let err = unzip_safely(z.path(), &dest, 100, 1 << 20).unwrap_err();
        assert!(err.contains("`../escape.txt` points outside"), "{err}");
        assert!(!outside.path().join("escape.txt").exists());
        assert_eq!(
            std::fs::read_dir(&dest).unwrap().count(),
            0,
            "nothing written"
        );
    }

    #[test]
    fn enforces_limits_and_strips_a_common_root() {
        let dest = tempfile::tempdir().unwrap();
        let z = zip_with(&[("repo-abc/a.py", "x"), ("repo-abc/src/b.py", "y")]);
        unzip_safely(z.path(), dest.path(), 100, 1 << 20).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.path().join("src/b.py")).unwrap(),
            "y"
        );
        let z = zip_with(&[("a", "1"), ("b", "2"), ("c", "3")]);
        assert!(
            unzip_safely(z.path(), dest.path(), 2, 1 << 20)
                .unwrap_err()
                .contains("3 entries")
        );
        let z = zip_with(&[("big", &"x".repeat(1000))]);
        assert!(
            unzip_safely(z.path(), dest.path(), 10, 100)
                .unwrap_err()
                .contains("more than 100 bytes")
        );
        std::fs::write(dest.path().join("junk.zip"), "not a zip").unwrap();
        assert!(
            unzip_safely(&dest.path().join("junk.zip"), dest.path(), 10, 100)
                .unwrap_err()
                .contains("not a valid ZIP")
        );
    }
}
