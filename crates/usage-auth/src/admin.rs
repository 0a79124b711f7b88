//! Who is an admin: a user whose id is listed in `ADMIN_ECO_IDS`.

use std::collections::BTreeSet;

use usage_core::UserId;

/// The users allowed on the admin endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminList {
    ids: BTreeSet<UserId>,
}

impl AdminList {
    /// Parses a comma-separated list of user ids (blanks ignored).
    ///
    /// ```
    /// use usage_auth::admin::AdminList;
    /// let admins = AdminList::parse("eco_usr_abc, eco_usr_def,").unwrap();
    /// assert!(admins.is_admin(&usage_core::UserId::parse("eco_usr_def").unwrap()));
    /// assert!(AdminList::parse("eco_usr_abc,admin").is_err());
    /// ```
    pub fn parse(list: &str) -> Result<Self, String> {
        let ids = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                UserId::parse(s).map_err(|_| {
                    format!("ADMIN_ECO_IDS must list user ids like eco_usr_..., got {s:?}")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { ids })
    }

    /// Whether `user` is an admin.
    pub fn is_admin(&self, user: &UserId) -> bool {
        self.ids.contains(user)
    }

    /// How many admins there are.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nobody is an admin.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
