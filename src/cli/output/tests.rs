//! Unit tests of [`super`].

use super::*;

#[test]
fn escapes_what_a_terminal_would_obey_and_nothing_else() {
    // Plain text, tabs, newlines and any script stay as they are.
    assert!(matches!(
        escape("ok\tdone\nnext ✅ héllo 日本"),
        Cow::Borrowed(_)
    ));
    // Escape sequences, bells, carriage returns, backspaces, DEL, C1
    // controls (0x9b is a one-byte CSI) and bidirectional overrides.
    assert_eq!(
        escape("\u{1b}]0;pwned\u{7}\u{1b}[2Jtitle\rover\u{8}\u{7f}\u{9b}31m"),
        r"\u{1b}]0;pwned\u{7}\u{1b}[2Jtitle\rover\u{8}\u{7f}\u{9b}31m"
    );
    assert_eq!(
        escape("abc\u{202e}fed\u{2066}x"),
        r"abc\u{202e}fed\u{2066}x"
    );
    // Escaping twice changes nothing more.
    let once = escape("\u{1b}[31m").into_owned();
    assert_eq!(escape(&once), once);
}
